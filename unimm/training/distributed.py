"""Distributed helpers: the global batch for the discriminative loss (no-ops in one process)."""

from __future__ import annotations

import torch


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, or ``(0, 1)`` outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_views(embeddings: torch.Tensor, teacher: list, views: list[tuple[int, int]]):
    """Global view embeddings (the local part keeps its gradient), teachers and views of all ranks."""
    rank, world = rank_and_world()
    if world == 1:
        return embeddings, teacher, views
    objects: list = [None] * world
    torch.distributed.all_gather_object(objects, (embeddings.shape[0], teacher, views))
    sizes = [o[0] for o in objects]
    longest = max(sizes)
    padded = torch.zeros(longest, embeddings.shape[1], dtype=embeddings.dtype, device=embeddings.device)
    padded[: embeddings.shape[0]] = embeddings.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    parts = [p[:s] for p, s in zip(parts, sizes, strict=True)]
    parts[rank] = embeddings  # keep the gradient of this rank's views
    all_teacher, all_views, offset = [], [], 0
    for _, t, v in objects:
        all_views.extend((b + offset, c) for b, c in v)
        all_teacher.extend(t)
        offset += len(t)
    return torch.cat(parts), all_teacher, all_views


def global_sum(value: float) -> float:
    _, world = rank_and_world()
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t.item())


def gather_objects(value) -> list:
    """``value`` from every rank, in rank order (``[value]`` in one process); a collective."""
    _, world = rank_and_world()
    if world == 1:
        return [value]
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, value)
    return gathered
