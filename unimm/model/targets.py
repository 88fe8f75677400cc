"""The structure-induced targets of a batch's views (docs/method.md, "The targets").

``M^l``: the normalised global alignment kernel between views, with the triple kernel of the
teacher features stored in the shards, and ``1`` for two views of the same sample. Training's
discriminative loss and evaluation's target-vs-learned comparison both use it.
"""

from __future__ import annotations

import torch

from unimm.align import gak_matrix_prefix, gak_matrix_triple
from unimm.config import AlignOptions
from unimm.errors import UnimmError


def same_sample_mask(views: list[tuple[int, int]], device=None) -> torch.Tensor:
    """``[N, N]`` true where two views come from the same sample (diagonal included)."""
    owner = torch.tensor([b for b, _ in views], device=device)
    return owner.unsqueeze(0) == owner.unsqueeze(1)


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; from the CPU to a GPU through pinned memory, without blocking."""
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def view_targets(
    teacher: list[dict | None],
    views: list[tuple[int, int]],
    align: AlignOptions,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The target matrix ``M^l`` ``[N, N]`` for views ``(sample, cut slice)`` of a batch, on ``device``.

    ``teacher[b]`` holds sample ``b``'s ``u``, ``v``, ``modality`` rows (one per slice, as stored by
    ``unimm prepare``). With a fixed σ the kernel of every pair of prefixes comes from one DP
    table per pair of samples (prefix sharing); otherwise the views are packed and compared pair
    by pair. The batch's features are concatenated where they are and moved to ``device`` once
    (default: where they are), and the alignment runs there — on a GPU, the fused Triton kernels.

    Raises:
        UnimmError: a sample has no teacher features.
    """
    if any(t is None for t in teacher):
        raise UnimmError(
            "the discriminative loss needs teacher features, but a batch sample has none; "
            "prepare the shards with --teacher-image-expert/--teacher-text-expert/--teacher-clip, "
            "or train generative-only with --set train.alpha=0"
        )
    used = sorted({b for b, _ in views})
    local = {b: i for i, b in enumerate(used)}
    need_u = align.teacher in ("triple", "mean")  # "mean" averages triple-kernel slice similarities
    if need_u and any("u" not in teacher[b] for b in used):
        raise UnimmError(
            f"align.teacher={align.teacher} needs expert features (u), but the shards hold CLIP "
            "features only; prepare with both experts, or use --set align.teacher=clip"
        )
    device = torch.device(device) if device is not None else teacher[used[0]]["v"].device
    counts = [max(c for bb, c in views if bb == b) + 1 for b in used]

    def packed(key: str) -> torch.Tensor:
        return _to(torch.cat([teacher[b][key][:n] for b, n in zip(used, counts, strict=True)]), device)

    v, modality = packed("v").float(), packed("modality").long()
    u = packed("u").float() if need_u else None
    lengths = torch.tensor(counts, device=device)
    view_sample = torch.tensor([local[b] for b, _ in views], device=device)
    view_cut = torch.tensor([c + 1 for _, c in views], device=device)
    fixed = align.sigma == "fixed" or not isinstance(align.sigma, str)
    if fixed and align.teacher != "mean":
        sigma = align.delta if align.sigma == "fixed" else float(align.sigma)
        targets = gak_matrix_prefix(
            u,
            v,
            modality,
            lengths,
            view_sample,
            view_cut,
            sigma=sigma,
            normalize=align.normalize,
            single_slice=align.single_slice,
            teacher=align.teacher,
        )
    else:
        starts = [sum(counts[:k]) for k in range(len(counts))]
        rows = torch.cat(
            [torch.arange(starts[local[b]], starts[local[b]] + c + 1, device=device) for b, c in views]
        )
        targets = gak_matrix_triple(
            u[rows] if u is not None else None,
            v[rows],
            modality[rows],
            view_cut,
            delta=align.delta,
            sigma=align.sigma,
            normalize=align.normalize,
            single_slice=align.single_slice,
            teacher=align.teacher,
        )
    same = same_sample_mask(views, device=targets.device)
    return torch.where(same, torch.ones_like(targets), targets).float()
