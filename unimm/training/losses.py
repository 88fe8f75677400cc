"""Losses of structure-induced joint training (docs/method.md).

- Targets ``M^l`` are computed by :func:`unimm.model.targets.view_targets` (shared with
  evaluation): the normalised global alignment kernel between views with the triple kernel of
  the teacher features stored in the shards, and ``1`` for two views of the same sample.
- Discriminative loss ``L_d`` between the student similarities ``M^r = r_i·r_j`` and ``M^l``:
  ``mse`` (the paper's, ``(1/N) Σ_i Σ_j (M^r_ij − M^l_ij)²``), ``infonce`` (same-sample views as
  positives) or ``kl`` (soft labels: KL between the rows of ``softmax(M^l/τ)`` and
  ``softmax(M^r/τ)``, as in UniME-V2).
- Pair loss ``L_p`` (pair records, :mod:`unimm.data.pairs`): InfoNCE of each query's embedding
  against its positive, with every other positive and every hard negative of the (global) batch
  as negatives (:func:`pair_loss`).
- The generative loss is computed by the model core (only at labelled positions).
"""

from __future__ import annotations

import torch

from unimm.model.core import truncate
from unimm.model.targets import same_sample_mask, view_targets

DISC_LOSSES = ("mse", "infonce", "kl")


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


def pair_loss(
    embeddings: torch.Tensor, pairs: list[tuple[int, int, list[int]]], temperature: float = 0.02
) -> torch.Tensor:
    """InfoNCE over pairs: ``−log softmax(q_i·c / τ)`` at ``c = p_i``, the candidates ``c`` being
    every pair's positive and every hard negative of the batch; the mean over the pairs.

    Args:
        embeddings: ``[N, d]`` unit view embeddings (of the global batch when distributed).
        pairs: per pair, the rows of its query, its positive and its hard negatives.
        temperature: ``τ`` (``train.pair_temperature``).
    """
    if not pairs:
        return embeddings.sum() * 0.0
    queries = torch.tensor([q for q, _, _ in pairs], device=embeddings.device)
    candidates = [p for _, p, _ in pairs] + [n for _, _, negatives in pairs for n in negatives]
    candidates_t = torch.tensor(candidates, device=embeddings.device)
    logits = embeddings[queries].float() @ embeddings[candidates_t].float().T / temperature
    target = torch.arange(len(pairs), device=embeddings.device)
    return torch.nn.functional.cross_entropy(logits, target)


def alignment_losses(
    embeddings: torch.Tensor, teacher: list, views: list[tuple[int, int]], pairs: list, cfg
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_d, L_p)`` of a (global) batch's view embeddings: the structural loss when
    ``train.alpha`` > 0 and the pair loss when the batch has pairs and ``train.pair_weight`` > 0
    (each a zero that keeps the graph otherwise); both averaged over the Matryoshka sizes."""
    zero = embeddings.sum() * 0.0
    train = cfg.train
    disc = structure_loss(embeddings, teacher, views, cfg) if train.alpha > 0 else zero
    if not pairs or train.pair_weight == 0:
        return disc, zero
    sizes = [embeddings.shape[-1], *cfg.model.matryoshka]
    losses = [pair_loss(truncate(embeddings, d), pairs, train.pair_temperature) for d in sizes]
    return disc, losses[0] if len(losses) == 1 else torch.stack(losses).mean()


def structure_loss(
    embeddings: torch.Tensor, teacher: list, views: list[tuple[int, int]], cfg
) -> torch.Tensor:
    """``L_d`` of a batch's views — the one place it is assembled: the targets ``M^l`` from the
    teachers' features (:func:`~unimm.model.targets.view_targets`, ``cfg.align``), the same-sample
    mask, and the loss ``cfg.train.disc_loss`` between them and ``embeddings @ embeddings.T``.

    Args:
        embeddings: ``[N, d]`` unit view embeddings (of the global batch when distributed).
        teacher: per sample of the batch, its teacher features (as stored in the shards).
        views: ``(sample, cut slice)`` of each embedding row.
        cfg: the training config (sections ``align`` and ``train``).
    """
    if len(views) < 2:  # a batch of generative-only samples (data tagged by task) has nothing to align
        return embeddings.sum() * 0.0
    targets = view_targets(teacher, views, cfg.align, device=embeddings.device)
    same = same_sample_mask(views, device=embeddings.device)
    train = cfg.train
    sizes = [embeddings.shape[-1], *cfg.model.matryoshka]  # Matryoshka: the mean over the sizes
    losses = [
        discriminative_loss(
            truncate(embeddings, d), targets, same, kind=train.disc_loss, temperature=train.temperature
        )
        for d in sizes
    ]
    return losses[0] if len(losses) == 1 else torch.stack(losses).mean()
