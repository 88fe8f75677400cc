"""Building the saved ANN index of an index folder (``unimm index build``), a part at a time.

    unimm index build --index INDEX --backend faiss-ivfpq            # 1 M+ documents
    unimm index build --index INDEX --backend faiss-ivfpq --resume   # after a kill

Memory stays bounded by the index being built, not by the vectors: the quantizers of IVF-PQ are
trained on a sample (``index.train_size`` vectors, read through a memory map of the parts), then
the index is filled one part of the embeddings (``embed.part_size`` vectors) at a time. A build holds the
index itself (``pq_m`` + 8 bytes a vector for IVF-PQ: 0.4 GB at 10 M × 32 bytes), one part and
the sample; never the 10 GB of float32 vectors of 10 M × 256.

Every ``index.checkpoint_every`` vectors the index built so far is saved to
``ann/.partial-<hash>.faiss``, then ``ann/.partial.json`` (the embeddings' hash, back end, build
parameters, parts done): ``--resume`` goes on from there after a crash or a kill; a build without
``--resume`` starts over. The finished index is written with FAISS's own ``write_index`` (no
pickle), then ``ann/ann.json``, the commit point; ``serve`` then maps its inverted lists from
the file instead of reading them (:func:`unimm.inference.ann.open_ann`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from unimm.config import IndexOptions
from unimm.errors import UnimmError
from unimm.inference.ann import (
    ANN_DIR,
    ANN_MANIFEST,
    BACKENDS,
    _faiss,
    check_fresh,
    open_ann,
    part_vectors,
    read_ann_manifest,
    search_params,
)
from unimm.utils import atomic_output, atomic_write_json

PARTIAL_JOURNAL = ".partial.json"
BUILD_KEYS = ("backend", "hnsw_m", "ef_construction", "nlist", "pq_m", "pq_bits", "train_size")
"""The options that shape a built index (a resumed build must be given the same)."""
SEARCH_KEYS = ("nprobe", "ef_search", "rerank")
"""The options of how it is searched (a resumed build takes the ones given now)."""


def _ivfpq_shape(n: int, dim: int, params: IndexOptions) -> tuple[int, int, int, int]:
    """``(nlist, pq_m, pq_bits, train_size)`` for ``n`` vectors of ``dim``."""
    nlist = params.nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
    pq_m = params.pq_m or max(m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0)
    if dim % pq_m:
        raise UnimmError(f"index.pq_m = {pq_m} does not divide the dimension {dim}; pick a divisor of {dim}")
    bits = min(params.pq_bits, max(1, int(math.log2(n))))
    train = params.train_size or min(n, max(256 * nlist, 1 << bits), 100_000)
    if nlist > n:
        raise UnimmError(f"index.nlist = {nlist} is more than the {n} vectors; lower it")
    return nlist, pq_m, bits, min(train, n)


def training_rows(n: int, size: int):
    """The ``size`` rows (of ``n``, sorted) the quantizers are trained on: a fixed random sample,
    so that a rebuild trains on the same vectors."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:size].sort().values.numpy()


def _new_index(
    backend: str, n: int, dim: int, params: IndexOptions, sample: Callable[[Any], Any]
) -> tuple[Any, dict[str, Any]]:
    """An empty (trained) FAISS index for ``n`` vectors of ``dim`` and the parameters it was made
    with; ``sample(rows)`` gives the vectors of those rows (float32 ``[len(rows), dim]``)."""
    faiss = _faiss()
    if backend == "faiss-flat":
        return faiss.IndexFlatIP(dim), {}
    if backend == "faiss-hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        used = {"hnsw_m": params.hnsw_m, "ef_construction": params.ef_construction}
        return index, used | {"ef_search": params.ef_search}
    if backend != "faiss-ivfpq":
        raise UnimmError(f"index backend {backend!r}: use {', '.join(BACKENDS)}")
    nlist, pq_m, bits, train = _ivfpq_shape(n, dim, params)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, bits, faiss.METRIC_INNER_PRODUCT)
    index.train(sample(training_rows(n, train)))
    index.quantizer_trains_alone = 0
    used = {"nlist": nlist, "pq_m": pq_m, "pq_bits": bits, "train_size": train}
    return index, used | {"nprobe": params.nprobe, "rerank": params.rerank}


def faiss_index(data, opts: IndexOptions) -> tuple[Any, dict[str, Any]]:
    """A FAISS index of ``opts.backend`` holding ``data`` (float32 ``[n, d]`` in memory, unit rows)
    and the parameters it was made with (searching ones applied)."""
    index, used = _new_index(opts.backend, data.shape[0], data.shape[1], opts, lambda rows: data[rows])
    index.add(data)
    search_params(index, used)
    return index, used


def build_ann(opts: IndexOptions, *, progress: bool = True) -> dict[str, Any]:
    """Build the ANN index of the finished index ``opts.index`` and save it beside the embeddings;
    return its manifest (``ann.json``). See the module docstring for memory and ``--resume``.

    Raises:
        UnimmError: no finished index, FAISS missing, parameters that do not fit the data, or a
            ``--resume`` of a build made with other parameters or over other embeddings.
    """
    from unimm.inference.store import MappedVectors, embeddings_hash, read_manifest
    from unimm.utils import progress_bar

    folder = Path(opts.index)
    manifest = read_manifest(folder)
    parts, digest = manifest["parts"], embeddings_hash(folder, manifest)
    (folder / ANN_DIR).mkdir(exist_ok=True)
    total = sum(int(p["count"]) for p in parts)
    resumed = _resume(folder, opts, digest) if opts.resume else None
    if resumed is None:
        _discard_partial(folder)
        stored = MappedVectors(folder, manifest)  # the sample's rows read, not whole parts
        dim = int(manifest["dim"])
        index, used = _new_index(opts.backend, total, dim, opts, lambda rows: stored.gather(rows).numpy())
        done = 0
    else:
        index, used, done = resumed
    initial = sum(int(p["count"]) for p in parts[:done])
    with progress_bar(
        total=total, initial=initial, desc="index build", unit="vec", disable=not progress
    ) as bar:
        unsaved = 0
        for number in range(done, len(parts)):
            vectors = part_vectors(folder, parts[number])
            index.add(vectors)
            bar.update(len(vectors))
            unsaved += len(vectors)
            if unsaved >= opts.checkpoint_every and number + 1 < len(parts):
                _checkpoint(folder, index, opts, used, digest, number + 1)
                unsaved = 0
    search_params(index, used)
    ann = _save(folder, index, opts.backend, used, digest)
    _discard_partial(folder)
    return ann


def _build_options(opts: IndexOptions) -> dict[str, Any]:
    return {key: getattr(opts, key) for key in BUILD_KEYS}


def _checkpoint(folder: Path, index, opts: IndexOptions, used: dict, digest: str, parts_done: int) -> None:
    """Save the index built so far and then the journal that names it (the journal is the
    commit point: a kill while saving leaves the previous checkpoint)."""
    faiss = _faiss()
    target = folder / ANN_DIR
    name = f".partial-{digest[:16]}-{parts_done:06d}.faiss"
    with atomic_output(target / name) as tmp:
        faiss.write_index(index, str(tmp))
    journal = {
        "kind": "unimm-ann-partial",
        "embeddings_hash": digest,
        "build": _build_options(opts),
        "params": used,
        "parts_done": parts_done,
        "file": name,
    }
    atomic_write_json(target / PARTIAL_JOURNAL, journal)
    for old in target.glob(".partial-*.faiss"):
        if old.name != name:
            old.unlink()


def _resume(folder: Path, opts: IndexOptions, digest: str) -> tuple[Any, dict, int] | None:
    """``(index, parameters, parts done)`` of the interrupted build in ``folder``, or None when
    there is none (the build starts from the beginning)."""
    import json

    path = folder / ANN_DIR / PARTIAL_JOURNAL
    if not path.is_file():
        return None
    journal = json.loads(path.read_text(encoding="utf-8"))
    if journal["embeddings_hash"] != digest:
        raise UnimmError(
            f"--resume: the interrupted build in {folder / ANN_DIR} was over other embeddings than the "
            "index holds now; build again without --resume"
        )
    asked = _build_options(opts)
    if journal["build"] != asked:
        differ = ", ".join(
            f"{k} = {journal['build'][k]} (now {asked[k]})"
            for k in BUILD_KEYS
            if journal["build"][k] != asked[k]
        )
        raise UnimmError(
            f"--resume: the interrupted build in {folder / ANN_DIR} was made with {differ}; give the same "
            "options, or build again without --resume"
        )
    index = _faiss().read_index(str(folder / ANN_DIR / journal["file"]))
    used = journal["params"] | {k: getattr(opts, k) for k in SEARCH_KEYS if k in journal["params"]}
    return index, used, int(journal["parts_done"])


def _discard_partial(folder: Path) -> None:
    for path in [folder / ANN_DIR / PARTIAL_JOURNAL, *(folder / ANN_DIR).glob(".partial-*.faiss")]:
        path.unlink(missing_ok=True)


def _save(folder: Path, index, backend: str, params: dict[str, Any], digest: str) -> dict[str, Any]:
    faiss = _faiss()
    target = folder / ANN_DIR
    target.mkdir(exist_ok=True)
    name = f"index-{digest[:16]}.faiss"
    with atomic_output(target / name) as tmp:
        faiss.write_index(index, str(tmp))
    size = (target / name).stat().st_size
    ann = {
        "kind": "unimm-ann",
        "backend": backend,
        "params": params,
        "file": name,
        "embeddings_hash": digest,
        "count": int(index.ntotal),
        "dim": int(index.d),
        "bytes": size,
        "bytes_per_vector": round(size / max(1, index.ntotal), 1),
        "faiss_version": faiss.__version__,
    }
    atomic_write_json(target / ANN_MANIFEST, ann)
    for old in target.glob("index-*.faiss"):
        if old.name != name:
            old.unlink()  # a server that mapped it keeps its pages until it reloads
    return ann


def extend_ann(folder: str | Path, base: dict[str, Any], new_parts: list[dict[str, Any]], manifest) -> None:
    """Add the vectors of ``new_parts`` (appended to the index ``base``) to the saved ANN index,
    a part at a time; nothing to do when there is none.

    Raises:
        UnimmError: the ANN index was built over other embeddings than ``base``'s.
    """
    from unimm.inference.store import embeddings_hash

    folder = Path(folder)
    ann = read_ann_manifest(folder)
    if ann is None:
        return
    check_fresh(folder, ann, embeddings_hash(folder, base))
    index = open_ann(folder, ann, mapped=False)
    for part in new_parts:
        index.add(part_vectors(folder, part))
    _save(folder, index, ann["backend"], ann["params"], embeddings_hash(folder, manifest))
