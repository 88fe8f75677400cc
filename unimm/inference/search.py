"""Search and metrics: exact top-k by inner product in blocks, qrels, Recall@k, MRR, nDCG@10.

Embeddings are unit vectors, so the inner product is the cosine. The exact search scores the
queries against the index in blocks of ``block`` rows (memory stays ``queries × block``) and
keeps a running top-k; it equals a full-matrix ``topk`` (a test checks it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from unimm.errors import UnimmError


def exact_search(
    queries: torch.Tensor, index: torch.Tensor, k: int, *, block: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` rows of ``index`` for each query by inner product: ``(scores [Q, k], rows [Q, k])``.

    Exact, and ties keep the lower row first. ``k`` is capped at the index size. On the CPU with
    FAISS installed the scores come from ``faiss.knn`` (its brute-force kernel beat torch's matmul
    alone here: docs/benchmarks.md), with 16 candidates more than ``k`` so that a group of tied
    scores at the k-th place (duplicated documents; scores within 1e-6 count as equal, as BLAS
    may round equal dot products differently) is seen whole; a longer group is decided by the
    blocked torch search. Either way the tie rule holds.
    """
    k = min(k, index.shape[0])
    if queries.device.type == "cpu" and index.device.type == "cpu" and k > 0:
        try:
            import faiss  # noqa: F401 - optional (unimm[faiss])
        except ImportError:
            pass
        else:
            return _faiss_exact(queries, index, k, block)
    return blocked_search(queries, index, k, block=block)


def blocked_search(
    queries: torch.Tensor, index: torch.Tensor, k: int, *, block: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`exact_search` with torch alone, ``block`` index rows at a time (any device)."""
    k = min(k, index.shape[0])
    best_scores = torch.full((queries.shape[0], 0), -math.inf, dtype=torch.float32, device=queries.device)
    best_rows = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    q = queries.float()
    for start in range(0, index.shape[0], block):
        part = index[start : start + block].to(q.device).float()
        values, indices = _block_top(q @ part.T, k)
        best_scores, best_rows = _canonical(
            torch.cat([best_scores, values], dim=1), torch.cat([best_rows, indices + start], dim=1), k
        )
    return best_scores, best_rows


def _block_top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of each row, the lower index first among equal scores: ``topk`` picks any of
    the tied candidates at the k-th place, so rows with such a tie are sorted stably instead."""
    wanted = min(k + 1, scores.shape[1])
    top = torch.topk(scores, wanted, dim=1)
    values, indices = top.values[:, :k].clone(), top.indices[:, :k].clone()
    if wanted > k:
        tied = (top.values[:, k - 1] == top.values[:, k]).nonzero().flatten()
        if tied.numel():
            order = torch.sort(scores[tied], dim=1, descending=True, stable=True)
            values[tied], indices[tied] = order.values[:, :k], order.indices[:, :k]
    return values, indices


def _canonical(scores: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` by score descending, then row ascending."""
    order = torch.argsort(rows, dim=1)
    scores, rows = scores.gather(1, order), rows.gather(1, order)
    keep = torch.argsort(-scores, dim=1, stable=True)[:, :k]
    return scores.gather(1, keep), rows.gather(1, keep)


_TIE = 1e-6  # scores this close count as equal: float32 rounding of equal dot products stays below it
_EXTRA = 16  # candidates past the k-th, to see the whole group of a tie at the k-th place


def _faiss_exact(queries: torch.Tensor, index: torch.Tensor, k: int, block: int):
    import faiss
    import numpy as np

    wanted = min(k + _EXTRA, index.shape[0])
    scores, rows = faiss.knn(
        np.ascontiguousarray(queries.float().numpy()),
        np.ascontiguousarray(index.float().numpy()),
        wanted,
        metric=faiss.METRIC_INNER_PRODUCT,
    )
    out_scores, out_rows, unsure = [], [], []
    for q, (s, r) in enumerate(zip(scores.tolist(), rows.tolist(), strict=True)):
        order, complete = _tie_order(s, r, k, whole_index=wanted == index.shape[0])
        out_scores.append([s[j] for j in order])
        out_rows.append([r[j] for j in order])
        if not complete:
            unsure.append(q)
    best_scores, best_rows = torch.tensor(out_scores), torch.tensor(out_rows, dtype=torch.long)
    if unsure:  # a tie group longer than the candidates FAISS returned: the torch search decides
        again = blocked_search(queries[unsure], index, k, block=block)
        best_scores[unsure], best_rows[unsure] = again
    return best_scores, best_rows


def _tie_order(scores: list[float], rows: list[int], k: int, *, whole_index: bool) -> tuple[list[int], bool]:
    """Positions of the first ``k`` of a descending candidate list, scores within ``_TIE`` of
    their neighbour counted as equal and ordered by row; and whether that is certain (the group at
    the k-th place ends inside the list, or the list is the whole index)."""
    order: list[int] = []
    start = 0
    for end in range(1, len(scores) + 1):
        if end == len(scores) or scores[end - 1] - scores[end] > _TIE:
            order.extend(sorted(range(start, end), key=rows.__getitem__))
            if len(order) >= k:
                return order[:k], end < len(scores) or whole_index
            start = end
    return order[:k], True


def read_qrels(path: str | Path) -> dict[str, dict[str, float]]:
    """Relevance judgements: JSONL ``{"query_id", "doc_id", "relevance"}`` or TREC ``qid 0 docid rel``.

    Raises:
        UnimmError: naming the file and line that cannot be read.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UnimmError(f"--qrels {path}: cannot read it ({exc.strerror or exc})") from None
    qrels: dict[str, dict[str, float]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            if line.lstrip().startswith("{"):
                row = json.loads(line)
                qid, did, rel = str(row["query_id"]), str(row["doc_id"]), float(row.get("relevance", 1))
            else:
                parts = line.split()
                if len(parts) != 4:
                    raise ValueError("expected 4 fields: query_id iteration doc_id relevance")
                qid, did, rel = parts[0], parts[2], float(parts[3])
        except (ValueError, KeyError, TypeError) as exc:
            raise UnimmError(f"{path}:{number}: not a qrels line ({exc})") from None
        qrels.setdefault(qid, {})[did] = rel
    if not qrels:
        raise UnimmError(f"--qrels {path}: no judgements in it")
    return qrels


def metrics(
    ranked: dict[str, list[str]], qrels: dict[str, dict[str, float]], ks=(1, 5, 10)
) -> dict[str, float]:
    """Recall@k, MRR and nDCG@10 averaged over the judged queries that were run.

    Recall@k: share of a query's relevant documents (relevance > 0) in its top k. MRR: mean of
    1/rank of the first relevant document (0 if none is retrieved). nDCG@10 with gains
    ``2^rel − 1`` and ``log2(rank + 1)`` discounts.
    """
    judged = [q for q in ranked if q in qrels and any(r > 0 for r in qrels[q].values())]
    if not judged:
        raise UnimmError("no query of this run has a relevant document in the qrels (check the query ids)")
    out = {f"recall@{k}": 0.0 for k in ks}
    out["mrr"] = 0.0
    out["ndcg@10"] = 0.0
    for q in judged:
        relevant = {d: r for d, r in qrels[q].items() if r > 0}
        docs = ranked[q]
        for k in ks:
            out[f"recall@{k}"] += sum(1 for d in docs[:k] if d in relevant) / len(relevant)
        first = next((i for i, d in enumerate(docs) if d in relevant), None)
        out["mrr"] += 0.0 if first is None else 1.0 / (first + 1)
        dcg = sum((2 ** relevant.get(d, 0.0) - 1) / math.log2(i + 2) for i, d in enumerate(docs[:10]))
        ideal = sorted(relevant.values(), reverse=True)[:10]
        idcg = sum((2**r - 1) / math.log2(i + 2) for i, r in enumerate(ideal))
        out["ndcg@10"] += dcg / idcg if idcg else 0.0
    return {name: value / len(judged) for name, value in out.items()} | {"queries": len(judged)}
