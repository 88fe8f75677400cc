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

    Ties keep the lower row first. ``k`` is capped at the index size.
    """
    k = min(k, index.shape[0])
    best_scores = torch.full((queries.shape[0], 0), -math.inf, dtype=torch.float32, device=queries.device)
    best_rows = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    q = queries.float()
    for start in range(0, index.shape[0], block):
        part = index[start : start + block].to(q.device).float()
        scores = q @ part.T
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        best_scores = torch.cat([best_scores, top.values], dim=1)
        best_rows = torch.cat([best_rows, top.indices + start], dim=1)
        # stable: sort by score descending, then row ascending
        order = torch.argsort(best_rows, dim=1)
        best_scores, best_rows = best_scores.gather(1, order), best_rows.gather(1, order)
        keep = torch.argsort(-best_scores, dim=1, stable=True)[:, :k]
        best_scores, best_rows = best_scores.gather(1, keep), best_rows.gather(1, keep)
    return best_scores, best_rows


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


def faiss_search(
    queries: torch.Tensor,
    index: torch.Tensor,
    k: int,
    *,
    kind: str = "flat",
    hnsw_m: int = 32,
    ef_search: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` by inner product with FAISS: ``flat`` (exact) or ``hnsw`` (approximate graph search).

    Raises:
        UnimmError: FAISS is not installed (``pip install "unimm[faiss]"``) or ``kind`` is unknown.
    """
    try:
        import faiss
    except ImportError:
        raise UnimmError(
            'the FAISS back end needs faiss: pip install "unimm[faiss]" (or faiss-gpu)'
        ) from None
    import numpy as np

    data = np.ascontiguousarray(index.float().cpu().numpy())
    dim = data.shape[1]
    if kind == "flat":
        searcher = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        searcher = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        searcher.hnsw.efSearch = ef_search
    else:
        raise UnimmError(f"FAISS index kind must be flat or hnsw, got {kind!r}")
    searcher.add(data)
    k = min(k, data.shape[0])
    scores, rows = searcher.search(np.ascontiguousarray(queries.float().cpu().numpy()), k)
    return torch.from_numpy(scores), torch.from_numpy(rows).long()
