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
    from unimm.inference.index import load_index, model_hash
    from unimm.inference.search import exact_search, faiss_search, metrics, read_qrels
    from unimm.inference.session import Session
    from unimm.outputs import claim_output
    from unimm.utils import atomic_write_bytes, atomic_write_json

    opts = cfg.retrieve
    inputs = [opts.index, opts.model, *(p for p in (opts.queries, opts.qrels) if p)]
    for flag, path in (("--out", opts.out), ("--metrics-out", opts.metrics_out)):
        if path:
            claim_output(Path(path), None, inputs, flag=flag)
    index, rows, manifest = load_index(opts.index)
    if manifest["model_hash"] != model_hash(opts.model):
        raise UnimmError(
            f"--index {opts.index} was embedded with another model ({manifest['model']}); embed it again "
            f"with --model {opts.model}, or retrieve with the model it was built with"
        )
    session = Session.load(
        opts.model, device=opts.device, dtype=opts.model_dtype, attn_implementation=opts.attn_implementation
    )
    if session.model.head.embed_dim != manifest["dim"]:
        raise UnimmError(
            f"dimension mismatch: the model embeds in {session.model.head.embed_dim}-d, the index holds "
            f"{manifest['dim']}-d vectors"
        )
    queries = load_queries(opts)
    per_slice = [
        rows
        for start in range(0, len(queries), 16)
        for rows in session.embed_slices(queries[start : start + 16])
    ]
    embedded = [rows[-1:] for rows in per_slice]  # the query as one view: cut after its last slice
    if opts.backend == "exact":
        scores, found = exact_search(torch.cat(embedded), index, opts.top_k, block=opts.block)
    else:
        scores, found = faiss_search(
            torch.cat(embedded), index, opts.top_k, kind=opts.backend.split("-", 1)[1]
        )
    if opts.rerank == "gak":
        scores, found = _rerank_gak(per_slice, found, opts)
    results = [
        {
            "query_id": q.id,
            "ids": [rows[int(r)]["id"] for r in found[i]],
            "scores": [round(float(s), 6) for s in scores[i]],
        }
        for i, q in enumerate(queries)
    ]
    if opts.out:
        atomic_write_bytes(opts.out, "".join(json.dumps(r) + "\n" for r in results).encode())
    scored = None
    if opts.qrels:
        scored = metrics({r["query_id"]: r["ids"] for r in results}, read_qrels(opts.qrels))
        if opts.metrics_out:
            atomic_write_json(opts.metrics_out, scored)
    return {"results": results, "metrics": scored, "rows": rows, "found": found}


def _rerank_gak(queries: list[torch.Tensor], found: torch.Tensor, opts: RetrieveOptions):
    """Re-score each query's candidates by ``K̃`` over per-slice embeddings; highest first."""
    from unimm.align import gak_matrix
    from unimm.inference.index import load_slice_embeddings

    slices, offsets = load_slice_embeddings(opts.index)
    new_scores, new_rows = [], []
    for q, candidates in zip(queries, found, strict=True):
        views = [q] + [slices[int(offsets[c]) : int(offsets[c + 1])] for c in candidates]
        lengths = torch.tensor([v.shape[0] for v in views])
        k = gak_matrix(torch.cat(views).double(), lengths, delta=opts.rerank_delta)[0, 1:].float()
        order = torch.argsort(-k, stable=True)
        new_scores.append(k[order])
        new_rows.append(candidates[order])
    return torch.stack(new_scores), torch.stack(new_rows)


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
