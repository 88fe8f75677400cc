"""``unimm bench index``: IVF-PQ indexes of millions of synthetic documents, unimm's build beside
FAISS's own with the same settings, each in a fresh process of its own.

    unimm bench index --docs 1000000 --docs 10000000 --nlist 4096 --pq-m 32

For each size: an index folder as ``unimm embed`` writes it (float16 parts of 10 000 documents
and their rows) is made of synthetic clustered unit vectors (:func:`clustered_unit_parts`; real
embeddings are clustered too, uniform random vectors are not). unimm's side builds the saved
index (``unimm index build``: trained on a sample, filled a part at a time) and searches it as
``serve`` does (inverted lists mapped from the file, rows read when found), by the codes alone and
re-ranked (``rerank``·k candidates re-scored from the stored vectors). FAISS's side trains
on the same sample (handed to it in a file), adds the same vectors in memory, writes its index
with ``write_index`` and searches the index it holds. Reported: build time, peak memory, size
on disk, the time to open the index for search, queries/s and recall@10 against exact search
over the stored vectors.
Children speak JSON and ``.npy`` files (``allow_pickle=False``): nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from unimm.data.synthetic import clustered_unit_parts

PART_SIZE = 10_000


def synthetic_queries(
    count: int, dim: int, *, docs: int, part_size: int = PART_SIZE, noise: float = 0.05, seed: int = 0
):
    """Queries that are perturbed documents (per-coordinate noise ``noise``): the first ``count``
    of the ``docs`` of :func:`clustered_unit_parts` with the same arguments. A query looks for a
    document near one it names, as bench retrieve's do; documents are drawn alike, so the first
    ones are as good as any."""
    import numpy as np
    import torch

    first, held = [], 0
    for part in clustered_unit_parts(docs, dim, part_size=part_size, seed=seed):
        first.append(part[: count - held])
        held += len(first[-1])
        if held == count:
            break
    g = torch.Generator().manual_seed(seed + 7_777_777)
    near = torch.from_numpy(np.concatenate(first)) + noise * torch.randn(held, dim, generator=g)
    return torch.nn.functional.normalize(near, dim=1)


def write_synthetic_index(
    folder: Path, n: int, dim: int, *, part_size: int = PART_SIZE, seed: int = 0
) -> dict:
    """An index folder of :func:`clustered_unit_parts` laid out as ``unimm embed`` writes one (float16
    parts with their sha256, rows with ids ``doc-00000000``…, the manifest last)."""
    import torch
    from safetensors.torch import save

    from unimm.inference.store import INDEX_MANIFEST
    from unimm.utils import atomic_write_bytes, atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    parts, start = [], 0
    for number, vectors in enumerate(clustered_unit_parts(n, dim, part_size=part_size, seed=seed)):
        name = f"embeddings-{number:05d}"
        data = save({"embeddings": torch.from_numpy(vectors).half()})
        atomic_write_bytes(folder / f"{name}.safetensors", data)
        rows = [{"id": f"doc-{i:08d}"} for i in range(start, start + len(vectors))]
        atomic_write_json(folder / f"{name}.json", {"rows": rows})
        parts.append({"name": name, "count": len(vectors), "sha256": hashlib.sha256(data).hexdigest()})
        start += len(vectors)
    manifest = {
        "kind": "unimm-index",
        "model": "synthetic",
        "model_hash": "synthetic",
        "dim": dim,
        "instruction": "",
        "count": n,
        "dtype": "float16",
        "per_slice": False,
        "parts": parts,
        "data": [],
        "runs": 1,
    }
    atomic_write_json(folder / INDEX_MANIFEST, manifest)
    return manifest


def exact_top_k(parts: Iterator[Any], queries, k: int):
    """Exact top-``k`` rows of each query over the vectors of ``parts`` (the recall oracle)."""
    import torch

    best_scores = torch.full((len(queries), k), -torch.inf)
    best_rows = torch.full((len(queries), k), -1, dtype=torch.long)
    start = 0
    for part in parts:
        scores = queries @ torch.from_numpy(part).T
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        merged = torch.cat([best_scores, top.values], dim=1)
        rows = torch.cat([best_rows, top.indices + start], dim=1)
        keep = merged.topk(k, dim=1).indices
        best_scores, best_rows = merged.gather(1, keep), rows.gather(1, keep)
        start += part.shape[0]
    return best_rows.numpy()


def check_room(sizes: list[int], dim: int, work: Path | None) -> None:
    """Refuse a run whose synthetic index (float16 parts and rows, the largest size at a time)
    would not fit the free disk of ``work``."""
    from unimm.errors import UnimmError

    where = Path(work) if work else Path(tempfile.gettempdir())
    if not where.is_dir():
        raise UnimmError(f"--work {where}: not a folder")
    need = max(sizes) * (2 * dim + 40 + dim // 2)  # parts, rows, the two IVF-PQ files at most
    free = shutil.disk_usage(where).free
    if need > free:
        raise UnimmError(
            f"{max(sizes)} documents of {dim} need about {need / 2**30:.1f} GiB free in {where}, which has "
            f"{free / 2**30:.1f} GiB; pass --work on a larger disk or fewer --docs"
        )


def _peak_mib() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _resident_mib() -> float:
    """Memory resident now (file pages mapped but not yet touched do not count)."""
    import os

    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def _ours(job: dict) -> dict:
    """In a fresh process: ``unimm index build``, then open and search the index as serve does."""
    import numpy as np

    from unimm.config import IndexOptions
    from unimm.inference.ann import open_ann
    from unimm.inference.ann_build import build_ann
    from unimm.inference.store import IndexRows, read_manifest

    folder, queries = Path(job["folder"]), np.load(job["queries"], allow_pickle=False)
    before = _peak_mib()
    start = time.perf_counter()
    opts = IndexOptions(index=str(folder), backend="faiss-ivfpq", **job["params"])
    ann = build_ann(opts, progress=False)
    built, build_peak = time.perf_counter() - start, _peak_mib()
    start = time.perf_counter()  # what Searcher does on the ANN path, without a model to load
    manifest = read_manifest(folder)
    index, rows = open_ann(folder, ann), IndexRows(folder, manifest)
    opened, opened_mib = time.perf_counter() - start, _resident_mib()
    per_s, found = _search_rate(lambda q, k: index.search(q, k)[1], queries, job["k"])
    ids = [rows[int(r)]["id"] for r in found[:8, 0]]  # rows read when found, as serve does
    np.save(job["found"], found, allow_pickle=False)
    reranked = {}
    if ann["params"].get("rerank", 0) > 1:  # what Searcher does with it: stored vectors re-score
        import torch

        from unimm.inference.ann import search_ann
        from unimm.inference.store import MappedVectors

        stored, tensor = MappedVectors(folder, manifest), torch.from_numpy(queries)
        rerank = ann["params"]["rerank"]
        rerank_per_s, found = _search_rate(
            lambda q, k: search_ann(index, q, k, stored, rerank)[1].numpy(), tensor, job["k"]
        )
        np.save(job["reranked"], found, allow_pickle=False)
        reranked = {"rerank_per_s": rerank_per_s}
    size = ann["bytes"]
    return reranked | {
        "open_resident_mib": opened_mib,
        "build_s": round(built, 1),
        "start_mib": before,
        "build_peak_mib": build_peak,
        "bytes": size,
        "open_s": round(opened, 3),
        "per_s": per_s,
        "first_ids": ids,
    }


def _search_rate(search: Callable[[Any, int], Any], queries, k: int) -> tuple[float, Any]:
    """Queries/s of ``search(queries, k)`` (the rows found) and the rows it finds."""
    from unimm.utils import bench_timer

    seconds = bench_timer("cpu")(lambda: search(queries, k))
    return round(len(queries) / seconds, 1), search(queries, k)


def _faiss(job: dict) -> dict:
    """In a fresh process: the same index made the way FAISS's own examples make it."""
    import faiss
    import numpy as np

    queries, n, dim, p = np.load(job["queries"], allow_pickle=False), job["docs"], job["dim"], job["used"]
    before = _peak_mib()
    sample = np.load(job["sample"], allow_pickle=False)  # the rows unimm trained on
    began = time.perf_counter()
    index = faiss.IndexIVFPQ(
        faiss.IndexFlatIP(dim), dim, p["nlist"], p["pq_m"], p["pq_bits"], faiss.METRIC_INNER_PRODUCT
    )
    index.train(sample)
    built = time.perf_counter() - began
    for part in clustered_unit_parts(n, dim, seed=job["seed"]):
        began = time.perf_counter()
        index.add(part)
        built += time.perf_counter() - began
    began = time.perf_counter()
    faiss.write_index(index, job["file"])
    built += time.perf_counter() - began
    build_peak = _peak_mib()
    start = time.perf_counter()
    index = faiss.read_index(job["file"])
    opened, opened_mib = time.perf_counter() - start, _resident_mib()
    index.nprobe = p["nprobe"]
    per_s, found = _search_rate(lambda q, k: index.search(q, k)[1], queries, job["k"])
    np.save(job["found"], found, allow_pickle=False)
    return {
        "build_s": round(built, 1),
        "start_mib": before,
        "build_peak_mib": build_peak,
        "bytes": Path(job["file"]).stat().st_size,
        "open_resident_mib": opened_mib,
        "open_s": round(opened, 3),
        "per_s": per_s,
    }


def _in_child(side: str, job: dict) -> dict:
    """Run ``side`` in a fresh interpreter (its own peak memory); JSON in, JSON out."""
    command = [sys.executable, "-m", "unimm.commands.bench_index", side, json.dumps(job)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench index ({side}) failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_index(
    sizes: list[int],
    *,
    dim: int = 256,
    params: dict[str, int] | None = None,
    queries: int = 1000,
    k: int = 10,
    work: Path | None = None,
    seed: int = 0,
) -> list[dict]:
    """One row per size and side (unimm, FAISS); see the module docstring. ``params``: the IVF-PQ
    options (``nlist``, ``pq_m``, ``nprobe``, …; 0 = chosen from the data). ``work``: where the
    synthetic index goes (a temporary folder by default; removed after)."""
    import numpy as np

    from unimm.config import IndexOptions
    from unimm.inference.ann import read_ann_manifest
    from unimm.inference.ann_build import training_rows
    from unimm.inference.store import MappedVectors, read_manifest

    root = Path(tempfile.mkdtemp(prefix="unimm-bench-index-", dir=work))
    rows: list[dict] = []
    try:
        for n in sizes:
            q = synthetic_queries(queries, dim, docs=n, seed=seed)
            np.save(root / "queries.npy", q.numpy(), allow_pickle=False)
            folder = root / f"index-{n}"
            started = time.perf_counter()
            write_synthetic_index(folder, n, dim, seed=seed)
            written = time.perf_counter() - started
            truth = exact_top_k(clustered_unit_parts(n, dim, seed=seed), q, k)
            job = {"queries": str(root / "queries.npy"), "k": k, "docs": n, "dim": dim, "seed": seed}
            IndexOptions(index=str(folder), **(params or {}))  # checked before any build
            files = {"found": str(root / "ours.npy"), "reranked": str(root / "reranked.npy")}
            ours = _in_child("ours", job | {"folder": str(folder), "params": params or {}} | files)
            used = read_ann_manifest(folder)["params"]
            sample = MappedVectors(folder, read_manifest(folder)).gather(training_rows(n, used["train_size"]))
            np.save(root / "sample.npy", sample.numpy())
            theirs = _in_child(
                "faiss",
                job
                | {"used": used, "sample": str(root / "sample.npy"), "file": str(root / "faiss.index")}
                | {"found": str(root / "faiss.npy")},
            )
            embeddings = sum(p.stat().st_size for p in folder.glob("embeddings-*.safetensors"))
            sides = [("unimm", ours, "ours.npy"), ("faiss", theirs, "faiss.npy")]
            if "rerank_per_s" in ours:  # the same index, its candidates re-scored from the stored vectors
                label = f"unimm, re-ranked x{used['rerank']}"
                sides.insert(1, (label, ours | {"per_s": ours["rerank_per_s"]}, "reranked.npy"))
            for side, got, found in sides:
                hits = np.load(root / found, allow_pickle=False)
                recall = sum(len(set(a) & set(b)) for a, b in zip(hits.tolist(), truth.tolist(), strict=True))
                rows.append(
                    {
                        "docs": n,
                        "dim": dim,
                        "side": side,
                        "params": used,
                        "recall_at_10": round(recall / (k * queries), 4),
                        "size_mib": round(got["bytes"] / 2**20, 1),
                        "peak_added_mib": round(got["build_peak_mib"] - got["start_mib"], 1),
                        **{
                            key: got[key]
                            for key in ("build_s", "build_peak_mib", "open_s", "open_resident_mib", "per_s")
                        },
                        "embeddings_mib": round(embeddings / 2**20, 1),
                        "index_written_s": round(written, 1),
                    }
                )
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


if __name__ == "__main__":  # a child of bench_index: python -m unimm.commands.bench_index SIDE JOB
    side, job = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(_ours(job) if side == "ours" else _faiss(job)))
