"""Losses of structure-induced joint training (docs/method.md).

- Targets ``M^l``: the normalised global alignment kernel between views with the triple kernel of
  the teacher features stored in the shards, and ``1`` for two views of the same sample.
- Discriminative loss ``L_d`` between the student similarities ``M^r = r_i·r_j`` and ``M^l``:
  ``mse`` (the paper's, ``(1/N) Σ_i Σ_j (M^r_ij − M^l_ij)²``), ``infonce`` (same-sample views as
  positives) or ``kl`` (soft labels: KL between the rows of ``softmax(M^l/τ)`` and
  ``softmax(M^r/τ)``, as in UniME-V2).
- The generative loss is computed by the model core (only at labelled positions).
"""

from __future__ import annotations

import torch

from unimm.align import gak_matrix_prefix, gak_matrix_triple
from unimm.config import AlignOptions
from unimm.errors import UnimmError

DISC_LOSSES = ("mse", "infonce", "kl")


def same_sample_mask(views: list[tuple[int, int]], device=None) -> torch.Tensor:
    """``[N, N]`` true where two views come from the same sample (diagonal included)."""
    owner = torch.tensor([b for b, _ in views], device=device)
    return owner.unsqueeze(0) == owner.unsqueeze(1)


def view_targets(
    teacher: list[dict | None], views: list[tuple[int, int]], align: AlignOptions
) -> torch.Tensor:
    """The target matrix ``M^l`` ``[N, N]`` for views ``(sample, cut slice)`` of a batch.

    ``teacher[b]`` holds sample ``b``'s ``u``, ``v``, ``modality`` rows (one per slice, as stored by
    ``unimm prepare``). With a fixed σ the kernel of every pair of prefixes comes from one DP
    table per pair of samples (prefix sharing); otherwise the views are packed and compared pair
    by pair.

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
    lengths = torch.tensor([max(c for bb, c in views if bb == b) + 1 for b in used])
    v = torch.cat([teacher[b]["v"][: int(n)].float() for b, n in zip(used, lengths, strict=True)])
    modality = torch.cat(
        [teacher[b]["modality"][: int(n)].long() for b, n in zip(used, lengths, strict=True)]
    )
    u = (
        torch.cat([teacher[b]["u"][: int(n)].float() for b, n in zip(used, lengths, strict=True)])
        if need_u
        else None
    )
    view_sample = torch.tensor([local[b] for b, _ in views])
    view_cut = torch.tensor([c + 1 for _, c in views])
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
        starts = torch.cumsum(lengths, 0) - lengths
        rows = torch.cat(
            [
                torch.arange(int(starts[s]), int(starts[s]) + int(c))
                for s, c in zip(view_sample, view_cut, strict=True)
            ]
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
    same = same_sample_mask(views)
    return torch.where(same, torch.ones_like(targets), targets).float()


def discriminative_loss(
    embeddings: torch.Tensor,
    targets: torch.Tensor,
    same_sample: torch.Tensor,
    *,
    kind: str = "mse",
    temperature: float = 0.05,
) -> torch.Tensor:
    """``L_d`` between student similarities ``embeddings @ embeddings.T`` and ``targets``.

    Args:
        embeddings: ``[N, d]`` unit view embeddings of the global batch.
        targets: ``[N, N]`` ``M^l``.
        same_sample: ``[N, N]`` views of one sample (InfoNCE positives).
        kind: ``mse``, ``infonce`` or ``kl``.
        temperature: ``τ`` of ``infonce`` and ``kl``.
    """
    if kind not in DISC_LOSSES:
        raise ValueError(f"disc_loss must be one of {DISC_LOSSES}, got {kind!r}")
    n = embeddings.shape[0]
    sim = embeddings.float() @ embeddings.float().T
    targets = targets.to(sim)
    if kind == "mse":
        return ((sim - targets) ** 2).sum() / n
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    logits = (sim / temperature).masked_fill(eye, float("-inf"))
    if kind == "infonce":
        positives = same_sample.to(sim.device) & ~eye
        rows = positives.any(1)
        if not bool(rows.any()):
            return sim.sum() * 0.0  # no view has a same-sample partner (cut_points = 1)
        pos = logits.masked_fill(~positives, float("-inf"))
        loss = torch.logsumexp(logits[rows], 1) - torch.logsumexp(pos[rows], 1)
        return loss.mean()
    soft = torch.softmax((targets / temperature).masked_fill(eye, float("-inf")), dim=1)
    log_q = torch.log_softmax(logits, dim=1).masked_fill(eye, 0.0)
    log_p = torch.log(soft.clamp_min(1e-30)).masked_fill(eye, 0.0)
    return (soft * (log_p - log_q)).sum(1).mean()
