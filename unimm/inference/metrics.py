"""Evaluation metrics as pure functions (``unimm eval`` computes the inputs; tests check them by hand).

- :func:`exact_match`: normalised string equality (case, surrounding punctuation, spaces);
  :func:`word_accuracy`: the share of reference words at their place (partial credit).
- :func:`choice_scores`: two-choice accuracy and MMVP-style group accuracy (a group of
  questions counts only when every question in it is right).
- :func:`ranking_scores`: Recall@k (a hit when any relevant item is in the top k), MRR and the
  chance level of Recall@1, from a score matrix and the relevant gallery items of each query.
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
    if any(not r for r in relevant):
        raise ValueError("every query needs at least one relevant gallery item")
    order = torch.argsort(-scores.double(), dim=1, stable=True)
    gallery = scores.shape[1]
    hits = {k: 0.0 for k in ks}
    reciprocal = 0.0
    for q, rel in enumerate(relevant):
        ranked = order[q].tolist()
        first = next(i for i, col in enumerate(ranked) if col in rel)
        reciprocal += 1.0 / (first + 1)
        for k in ks:
            hits[k] += float(first < k)
    n = len(relevant)
    out: dict[str, float] = {f"R@{k}": hits[k] / n for k in ks}
    out["MRR"] = reciprocal / n
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
