"""Exact search against brute force, and retrieval metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from unimm.errors import UnimmError
from unimm.inference.search import exact_search, metrics, read_qrels


def test_blocked_search_equals_full_matrix():
    g = torch.Generator().manual_seed(0)
    index = torch.nn.functional.normalize(torch.randn(1000, 16, generator=g), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(7, 16, generator=g), dim=-1)
    scores, rows = exact_search(queries, index, 10, block=97)
    full = queries @ index.T
    want = torch.topk(full, 10, dim=1)
    torch.testing.assert_close(scores, want.values)
    assert torch.equal(rows, want.indices)
    assert exact_search(queries, index[:3], 10)[1].shape == (7, 3)  # k capped at the index size


def test_ties_keep_the_lower_row():
    index = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    _, rows = exact_search(torch.tensor([[1.0, 0.0]]), index, 2, block=1)
    assert rows.tolist() == [[0, 1]]


def test_metrics_equal_hand_computation():
    ranked = {"q1": ["a", "b", "c"], "q2": ["x", "y", "z"], "q3": ["m"]}
    qrels = {"q1": {"b": 1, "c": 1}, "q2": {"z": 2}, "unrun": {"a": 1}}
    got = metrics(ranked, qrels)
    assert got["queries"] == 2
    assert got["recall@1"] == pytest.approx(0.0)
    assert got["recall@5"] == pytest.approx((1.0 + 1.0) / 2)
    assert got["mrr"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    ndcg_q1 = (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    ndcg_q2 = (3 / math.log2(4)) / 3
    assert got["ndcg@10"] == pytest.approx((ndcg_q1 + ndcg_q2) / 2)


def test_qrels_formats_and_errors(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"query_id": "q1", "doc_id": "d1", "relevance": 1}\n')
    (tmp_path / "q.trec").write_text("q1 0 d1 1\nq1 0 d2 0\n")
    assert read_qrels(tmp_path / "q.jsonl") == {"q1": {"d1": 1.0}}
    assert read_qrels(tmp_path / "q.trec") == {"q1": {"d1": 1.0, "d2": 0.0}}
    (tmp_path / "bad.trec").write_text("q1 d1\n")
    with pytest.raises(UnimmError, match=r"bad\.trec:1"):
        read_qrels(tmp_path / "bad.trec")
    with pytest.raises(UnimmError, match="no query of this run"):
        metrics({"q9": ["d1"]}, {"q1": {"d1": 1}})


def test_faiss_flat_equals_exact_and_hnsw_recalls():
    pytest.importorskip("faiss")
    from unimm.config import IndexOptions
    from unimm.inference.ann_build import faiss_index

    g = torch.Generator().manual_seed(3)
    index = torch.nn.functional.normalize(torch.randn(2000, 32, generator=g), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(20, 32, generator=g), dim=-1)
    exact_scores, exact_rows = exact_search(queries, index, 10)
    flat, _ = faiss_index(index.numpy(), IndexOptions(backend="faiss-flat"))
    flat_scores, flat_rows = flat.search(queries.numpy(), 10)
    assert torch.equal(torch.from_numpy(flat_rows), exact_rows)
    torch.testing.assert_close(torch.from_numpy(flat_scores), exact_scores, atol=1e-5, rtol=1e-5)
    hnsw, params = faiss_index(index.numpy(), IndexOptions(backend="faiss-hnsw"))
    assert params == {"hnsw_m": 32, "ef_construction": 200, "ef_search": 128}
    _, hnsw_rows = hnsw.search(queries.numpy(), 10)
    recall = (
        sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(hnsw_rows, exact_rows, strict=True)) / 200
    )
    assert recall > 0.9


def test_the_faiss_path_equals_the_torch_path_ties_included():
    """With FAISS installed the CPU search runs faiss.knn; rows (ties at the k-th place included:
    duplicated documents) are exactly the blocked torch search's."""
    pytest.importorskip("faiss")
    from unimm.inference.search import blocked_search

    g = torch.Generator().manual_seed(3)
    base = torch.nn.functional.normalize(torch.randn(300, 32, generator=g), dim=-1)
    index = torch.cat([base, base[:50], base[:50]])  # every one of the first 50 three times
    queries = torch.cat([base[:20], torch.nn.functional.normalize(torch.randn(20, 32, generator=g), dim=-1)])
    for k in (1, 2, 3, 5):
        scores, rows = exact_search(queries, index, k)
        want_scores, want_rows = blocked_search(queries, index, k, block=64)
        assert torch.equal(rows, want_rows), k
        torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=1e-5)
    tie = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    assert exact_search(torch.tensor([[1.0, 0.0]]), tie, 2)[1].tolist() == [[0, 2]]


def test_a_tie_group_longer_than_the_candidates_is_decided_by_the_torch_search():
    """30 copies of the best document and k=5: FAISS's k+16 candidates cannot hold the whole group,
    so the torch search decides, and the five lowest copies come back."""
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(4)
    others = torch.nn.functional.normalize(torch.randn(100, 8, generator=g), dim=-1)
    best = torch.nn.functional.normalize(torch.ones(1, 8), dim=-1)
    index = torch.cat([others[:50], best.expand(30, 8), others[50:]])
    _, rows = exact_search(best, index, 5)
    assert rows.tolist() == [[50, 51, 52, 53, 54]]
