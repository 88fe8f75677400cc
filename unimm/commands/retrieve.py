"""``unimm retrieve``: embed queries with the checkpoint and search an index built by ``unimm embed``.

    unimm retrieve --model RUN/step-000200 --index index --query "two red circles" --top-k 5
    unimm retrieve --model RUN/step-000200 --index index --query "like this:" --image q.png
    unimm retrieve --model RUN/step-000200 --index index --queries queries.jsonl --qrels qrels.jsonl

``--query`` and ``--image`` may be repeated; together, in the order given, they form one
interleaved query. ``--queries FILE`` reads one query per record (any ``unimm prepare`` input
format; image paths relative to the file's folder or ``--image-root``). A query is embedded
like a document: as one view cut after its last slice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from unimm.config import RetrieveConfig, RetrieveOptions
from unimm.errors import UnimmError

if TYPE_CHECKING:
    from unimm.data.samples import Sample


def load_queries(opts: RetrieveOptions) -> list[Sample]:
    """Queries as decoded samples (images opened)."""
    from unimm.data.adapters import load_decoded_records, open_image
    from unimm.data.samples import Sample, Slice

    if opts.query:
        slices = []
        for kind, value in opts.query:
            if kind == "text":
                if not value.strip():
                    raise UnimmError("--query: the text is empty")
                slices.append(Slice.of_text(value))
            else:
                slices.append(Slice.of_image(open_image(value)))
        return [Sample.of_slices(slices, key="query", id="query")]
    path = Path(opts.queries)
    if not path.is_file():
        raise UnimmError(f"--queries {path}: no such file")
    try:
        out = load_decoded_records(path, opts.format, opts.image_root)
    except UnimmError as exc:
        raise UnimmError(f"--queries: {exc}") from None
    if not out:
        raise UnimmError(f"--queries {path}: no query in it")
    return out


def run(cfg: RetrieveConfig) -> dict[str, Any]:
    """Search and (with qrels) score; return ``{"results": [...], "metrics": {...} | None}``."""
    from unimm.inference.search import metrics, read_qrels
    from unimm.inference.session import Session
    from unimm.inference.vectordb import searcher_for
    from unimm.outputs import claim_output
    from unimm.utils import atomic_write_bytes, atomic_write_json

    opts = cfg.retrieve
    inputs = [p for p in (opts.index, opts.model, opts.queries, opts.qrels, opts.db) if p]
    for flag, path in (("--out", opts.out), ("--metrics-out", opts.metrics_out)):
        if path:
            claim_output(Path(path), None, inputs, flag=flag)
    session = Session.load(opts.model, **opts.session_options())
    searcher = searcher_for(opts, session)
    queries = load_queries(opts)
    per_slice = [
        rows
        for start in range(0, len(queries), 16)
        for rows in session.embed_slices(queries[start : start + 16], role="query")
    ]
    embedded = torch.cat(
        [rows[-1:] for rows in per_slice]
    )  # each query as one view: cut after its last slice
    try:
        hits = searcher.search(embedded, opts.top_k, block=opts.block)
    finally:
        if opts.db:
            searcher.close()
    if opts.rerank == "gak":
        hits = _rerank_gak(per_slice, hits, opts)
    rows = searcher.rows
    results = [
        {
            "query_id": q.id,
            "ids": [rows[r]["id"] for r, _ in found],
            "scores": [round(score, 6) for _, score in found],
        }
        for q, found in zip(queries, hits, strict=True)
    ]
    if opts.out:
        atomic_write_bytes(opts.out, "".join(json.dumps(r) + "\n" for r in results).encode())
    scored = None
    if opts.qrels:
        scored = metrics({r["query_id"]: r["ids"] for r in results}, read_qrels(opts.qrels))
        if opts.metrics_out:
            atomic_write_json(opts.metrics_out, scored)
    return {"results": results, "metrics": scored, "rows": rows, "hits": hits, "backend": searcher.backend}


def _rerank_gak(queries: list[torch.Tensor], hits: list[list[tuple[int, float]]], opts: RetrieveOptions):
    """Re-score each query's candidates by ``K̃`` over per-slice embeddings; highest first."""
    from unimm.align import gak_matrix
    from unimm.inference.store import load_slice_embeddings

    slices, offsets = load_slice_embeddings(opts.index)
    out = []
    for q, found in zip(queries, hits, strict=True):
        candidates = [r for r, _ in found]
        views = [q] + [slices[int(offsets[c]) : int(offsets[c + 1])] for c in candidates]
        lengths = torch.tensor([v.shape[0] for v in views])
        k = gak_matrix(torch.cat(views).double(), lengths, delta=opts.rerank_delta)[0, 1:].float()
        order = torch.argsort(-k, stable=True).tolist()
        out.append([(candidates[i], float(k[i])) for i in order])
    return out


def query_order(argv: list[str]) -> list[list[str]]:
    """``[kind, value]`` pairs of ``--query``/``--image`` options in the order they appear in ``argv``."""
    order = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        for flag, kind in (("--query", "text"), ("--image", "image")):
            if arg == flag and i + 1 < len(argv):
                order.append([kind, argv[i + 1]])
                i += 1
            elif arg.startswith(flag + "="):
                order.append([kind, arg[len(flag) + 1 :]])
        i += 1
    return order
