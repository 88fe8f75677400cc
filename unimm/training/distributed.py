"""Distributed and device helpers: the global batch for the discriminative loss (no-ops in one
process), and the mixed precision this machine supports.

Every collective takes tensors on the process group's own device (:func:`collective_device`: the
current GPU under NCCL, which has no CPU transport, the CPU under gloo), and the per-step traffic
is tensors only: view embeddings, views and teacher features are gathered padded, never pickled.
"""

from __future__ import annotations

import torch


def resolve_mixed_precision(requested: str) -> str:
    """``train.mixed_precision`` for this machine's device.

    ``auto`` is bf16 on a GPU with native bf16 (compute capability 8.0 and up: A100, H100, RTX 30xx
    and newer), fp16 on an older GPU, and no on a CPU. bf16 on a GPU without it (emulated, far
    slower) and fp16 on a CPU (no fp16 autocast there) are refused with the setting to use.
    """
    from unimm.errors import UnimmError

    if not torch.cuda.is_available():
        if requested == "fp16":
            raise UnimmError(
                "train.mixed_precision=fp16 needs a GPU, and none is visible: set it to auto or no "
                "(bf16 also works on a CPU, slowly)"
            )
        return "no" if requested == "auto" else requested
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if requested == "auto":
        return "bf16" if native_bf16 else "fp16"
    if requested == "bf16" and not native_bf16:
        major, minor = torch.cuda.get_device_capability()
        raise UnimmError(
            f"train.mixed_precision=bf16: {torch.cuda.get_device_name()} (compute capability "
            f"{major}.{minor}) has no native bf16, which needs 8.0 or newer; set "
            "train.mixed_precision=auto (fp16 on this GPU), fp16 or no"
        )
    return requested


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, or ``(0, 1)`` outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def collective_device() -> torch.device:
    """Where the default process group's collectives take their tensors: the current CUDA
    device under NCCL, the CPU otherwise (gloo, or no process group)."""
    if rank_and_world()[1] > 1 and "nccl" in str(torch.distributed.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_padded(local: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Every rank's ``local`` (``sizes[r]`` rows each, the rest of the shape alike), in rank order,
    on the collective device: padded to the longest, gathered, cut back."""
    longest = max(sizes)
    padded = local.new_zeros((longest, *local.shape[1:]), device=collective_device())
    padded[: local.shape[0]] = local.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(parts, padded)
    return [part[:size] for part, size in zip(parts, sizes, strict=True)]


_TEACHER_KEYS = ("v", "modality", "u")


def _header(embeddings: torch.Tensor, teacher: list, views: list) -> torch.Tensor:
    """This rank's counts and feature widths: what the others need to size their buffers."""
    present = bool(teacher) and all(t is not None for t in teacher)
    has_u = present and all("u" in t for t in teacher)
    slices = sum(int(t["v"].shape[0]) for t in teacher) if present else 0
    dv = int(teacher[0]["v"].shape[1]) if present else 0
    du = int(teacher[0]["u"].shape[1]) if has_u else 0
    row = [embeddings.shape[0], len(views), len(teacher), slices, int(present), int(has_u), dv, du]
    return torch.tensor(row, dtype=torch.long, device=collective_device())


def gather_views(embeddings: torch.Tensor, teacher: list, views: list[tuple[int, int]]):
    """Global view embeddings (the local part keeps its gradient), teachers and views of all ranks.

    The teacher features of every rank arrive as tensors on the collective device (each sample's
    ``v``, ``modality`` and, when every rank has them, ``u``); a rank whose samples lack features
    makes every rank's list hold ``None``, so that every rank raises the same error.
    """
    rank, world = rank_and_world()
    if world == 1:
        return embeddings, teacher, views
    header = _header(embeddings, teacher, views)
    headers = [torch.empty_like(header) for _ in range(world)]
    torch.distributed.all_gather(headers, header)
    n_embedded, n_views, n_samples, n_slices, present, has_u, _, _ = (
        [int(h[k]) for h in headers] for k in range(8)
    )
    parts = [p.to(embeddings.device) for p in _all_gather_padded(embeddings, n_embedded)]
    parts[rank] = embeddings  # keep the gradient of this rank's views
    local_views = torch.tensor(views, dtype=torch.long).reshape(-1, 2)
    all_views, offset = [], 0
    for part, samples in zip(_all_gather_padded(local_views, n_views), n_samples, strict=True):
        all_views.extend((b + offset, c) for b, c in part.tolist())
        offset += samples
    if not all(present):
        return torch.cat(parts), [None] * offset, all_views
    return torch.cat(parts), _gather_teacher(teacher, n_samples, n_slices, all(has_u)), all_views


def _gather_teacher(teacher: list[dict], n_samples: list[int], n_slices: list[int], with_u: bool) -> list:
    """Every rank's per-sample teacher features (``v``, ``modality``, ``u`` if ``with_u``)."""
    keys = _TEACHER_KEYS if with_u else _TEACHER_KEYS[:2]
    counts = torch.tensor([int(t["v"].shape[0]) for t in teacher], dtype=torch.long)
    all_counts = [c.tolist() for c in _all_gather_padded(counts, n_samples)]
    features = {key: _all_gather_padded(torch.cat([t[key] for t in teacher]), n_slices) for key in keys}
    out = []
    for r, per_sample in enumerate(all_counts):
        pieces = {key: torch.split(features[key][r], per_sample) for key in keys}
        out.extend({key: pieces[key][s] for key in keys} for s in range(len(per_sample)))
    return out


def gather_pairs(pairs: list[tuple[int, int, list[int]]], local_views: int) -> list:
    """Every rank's pairs (query, positive, negatives as rows of the gathered view embeddings:
    each rank's rows moved past the views of the ranks before it), in rank order."""
    _, world = rank_and_world()
    if world == 1:
        return pairs
    width = 2 + max((len(n) for _, _, n in pairs), default=0)
    header = torch.tensor([len(pairs), width, local_views], dtype=torch.long, device=collective_device())
    headers = [torch.empty_like(header) for _ in range(world)]
    torch.distributed.all_gather(headers, header)
    counts, widths, view_counts = ([int(h[k]) for h in headers] for k in range(3))
    if not any(counts):
        return []
    table = torch.full((len(pairs), max(widths)), -1, dtype=torch.long)
    for row, (query, positive, negatives) in enumerate(pairs):
        table[row, : 2 + len(negatives)] = torch.tensor([query, positive, *negatives])
    out, offset = [], 0
    for part, views in zip(_all_gather_padded(table, counts), view_counts, strict=True):
        for row in part.tolist():
            kept = [v + offset for v in row if v >= 0]
            out.append((kept[0], kept[1], kept[2:]))
        offset += views
    return out


def global_sum(value: float) -> float:
    """``value`` summed over the ranks (``value`` in one process); a collective."""
    _, world = rank_and_world()
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(t)
    return float(t.item())


def gather_objects(value) -> list:
    """``value`` from every rank, in rank order (``[value]`` in one process); a collective.

    Pickled: for the few small objects of a checkpoint save (each rank's data position), never
    per step.
    """
    _, world = rank_and_world()
    if world == 1:
        return [value]
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (a collective; a tensor, nothing pickled)."""
    _, world = rank_and_world()
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    torch.distributed.broadcast(t, src=0)
    return bool(t.item())
