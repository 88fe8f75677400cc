"""Evaluation metrics as pure functions (``unimm eval`` computes the inputs; tests check them by hand).

- :func:`exact_match`: normalised string equality (case, surrounding punctuation, spaces);
  :func:`word_accuracy`: the share of reference words at their place (partial credit).
- :func:`choice_scores`: two-choice accuracy and MMVP-style group accuracy (a group of
  questions counts only when every question in it is right).
- :func:`ranking_scores`: Recall@k (a hit when any relevant item is in the top k), MRR and the
  chance level of Recall@1, from a score matrix and the relevant gallery items of each query
  (:func:`first_relevant_ranks` and :func:`recall_scores`, its two halves, serve the benchmarks'
  chunked rankings).
- :func:`winoground_scores`: text, image and group scores of 2×2 caption–image similarity blocks.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import torch

_PUNCTUATION = string.punctuation + "“”‘’"


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no punctuation around the words (``" Two."`` → ``"two"``)."""
    words = [w.strip(_PUNCTUATION) for w in text.lower().split()]
    return " ".join(w for w in words if w)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after :func:`normalize_answer`."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return float("nan")
    hits = sum(
        normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True)
    )
    return hits / len(references)


def word_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean share of each reference's words that the prediction has at the same position.

    A partial-credit companion to :func:`exact_match` for short descriptions with a fixed word
    order (``"two red circles on the left"`` vs ``"two blue circles on the left"``: 5/6).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return float("nan")
    total = 0.0
    for p, r in zip(predictions, references, strict=True):
        got, want = normalize_answer(p).split(), normalize_answer(r).split()
        total += sum(g == w for g, w in zip(got, want, strict=False)) / max(1, len(want))
    return total / len(references)


def choice_scores(correct: Sequence[bool], groups: Sequence[str | None]) -> dict[str, float]:
    """``accuracy`` over questions; ``group_accuracy`` over groups (every member right); counts.

    Questions without a group are left out of the group score.
    """
    by_group: dict[str, list[bool]] = {}
    for ok, group in zip(correct, groups, strict=True):
        if group is not None:
            by_group.setdefault(group, []).append(bool(ok))
    out = {
        "accuracy": sum(map(bool, correct)) / len(correct) if correct else float("nan"),
        "questions": len(correct),
        "groups": len(by_group),
    }
    out["group_accuracy"] = (
        sum(all(v) for v in by_group.values()) / len(by_group) if by_group else float("nan")
    )
    return out


def first_relevant_ranks(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's best-placed relevant column in its descending ranking.

    ``scores`` ``[queries, gallery]`` (higher = better), ``relevant`` a boolean mask of the same
    shape with at least one true per row. Ties are broken by column order, as a stable sort does:
    the rank is the number of columns scoring above the best relevant score, plus the columns
    scoring the same that come before it. Vectorised: no sort of the gallery.
    """
    if scores.shape != relevant.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and relevance {tuple(relevant.shape)} differ")
    if not bool(relevant.any(1).all()):
        raise ValueError("every query needs at least one relevant gallery item")
    s = scores.double()
    best = torch.where(relevant, s, torch.full_like(s, -torch.inf)).max(1, keepdim=True).values
    columns = torch.arange(s.shape[1], device=s.device).expand_as(s)
    # the first column, in gallery order, that is relevant and scores the best relevant score
    first = torch.where(relevant & (s == best), columns, s.shape[1]).min(1, keepdim=True).values
    return ((s > best) | ((s == best) & (columns < first))).sum(1)


def recall_scores(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k (the share of queries with a relevant item in the top k) and MRR from the 0-based
    ranks of :func:`first_relevant_ranks`."""
    n = len(ranks)
    if not n:
        return {**{f"R@{k}": float("nan") for k in ks}, "MRR": float("nan")}
    r = ranks.double()
    out = {f"R@{k}": (r < k).double().mean().item() for k in ks}
    out["MRR"] = (1.0 / (r + 1)).mean().item()
    return out


def ranking_scores(
    scores: torch.Tensor, relevant: Sequence[set[int]], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Retrieval metrics from ``scores`` ``[queries, gallery]`` (higher = better).

    ``relevant[q]`` holds the gallery columns that answer query ``q`` (at least one). Ties are
    broken by column order, as a stable sort does. ``chance@1`` is the expected Recall@1 of a
    random ranking: the mean of ``|relevant| / gallery``.
    """
    if scores.dim() != 2 or scores.shape[0] != len(relevant):
        raise ValueError(f"scores {tuple(scores.shape)} do not match {len(relevant)} queries")
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    for q, rel in enumerate(relevant):
        mask[q, list(rel)] = True
    n, gallery = scores.shape
    out: dict[str, float] = recall_scores(first_relevant_ranks(scores, mask), ks)
    out["chance@1"] = sum(len(r) for r in relevant) / (n * gallery)
    out["queries"] = n
    out["gallery"] = gallery
    return out


def winoground_scores(similarity: torch.Tensor) -> dict[str, float]:
    """Winoground scores of ``similarity`` ``[P, 2, 2]``: ``similarity[p, c, i]`` = s(caption c, image i).

    Caption c belongs to image c. Text score: each image prefers its own caption; image score:
    each caption prefers its own image; group: both. Chance levels are 1/4, 1/4 and 1/6.
    """
    if similarity.dim() != 3 or similarity.shape[1:] != (2, 2):
        raise ValueError(f"expected [P, 2, 2] similarities, got {tuple(similarity.shape)}")
    s = similarity.double()
    text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    group = text & image
    n = s.shape[0]
    return {
        "text": text.double().mean().item() if n else float("nan"),
        "image": image.double().mean().item() if n else float("nan"),
        "group": group.double().mean().item() if n else float("nan"),
        "pairs": n,
    }
