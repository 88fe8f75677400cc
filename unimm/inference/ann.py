"""A persistent approximate-nearest-neighbour index beside an index's embeddings, and the one
searcher that retrieve, chat and serve use.

    unimm index build --index INDEX --backend faiss-hnsw

writes ``INDEX/ann/index-<hash>.faiss`` (FAISS's own file format, never a pickle) and then
``INDEX/ann/ann.json`` (backend, parameters, the embeddings' hash, size): the JSON is the commit
point, so a crash leaves the old index or the new one. An ANN index whose embeddings' hash is not
the index's any more (re-embedded) is refused with the command that rebuilds it; ``unimm embed
--append`` adds the new vectors to it, so an index grows without a rebuild.

Back ends (inner product on unit vectors = cosine):

- ``faiss-flat``: exact, the vectors in float32 (4·d bytes each);
- ``faiss-hnsw``: a graph (HNSW, ``hnsw_m`` links per node), float32 vectors plus the graph;
- ``faiss-ivfpq``: ``nlist`` inverted lists with product-quantized codes (``pq_m`` bytes per
  vector at 8 bits): memory for 1 M+ vectors, approximate scores.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from unimm.config import IndexOptions
from unimm.errors import UnimmError
from unimm.utils import atomic_write_bytes, atomic_write_json

BACKENDS = ("faiss-flat", "faiss-hnsw", "faiss-ivfpq")
ANN_DIR = "ann"
ANN_MANIFEST = "ann.json"


def _faiss():
    try:
        import faiss
    except ImportError:
        raise UnimmError('ANN indexes need FAISS: pip install "unimm[faiss]" (or faiss-gpu)') from None
    return faiss


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


def faiss_index(data, opts: IndexOptions) -> tuple[Any, dict[str, Any]]:
    """A FAISS index of ``opts.backend`` holding ``data`` (float32 ``[n, d]``, unit rows) and the
    parameters it was made with (searching ones applied)."""
    index, used = _new_index(opts.backend, data, opts)
    index.add(data)
    _search_params(index, used)
    return index, used


def _search_params(index, params: dict[str, Any]) -> None:
    if "ef_search" in params:
        index.hnsw.efSearch = params["ef_search"]
    if "nprobe" in params:
        index.nprobe = params["nprobe"]


def _new_index(backend: str, data, params: IndexOptions) -> tuple[Any, dict[str, Any]]:
    """An empty (trained) FAISS index for ``data`` and the parameters it was made with."""
    faiss = _faiss()
    n, dim = data.shape
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
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:train].sort().values.numpy()
    index.train(data[rows])
    index.quantizer_trains_alone = 0
    used = {"nlist": nlist, "pq_m": pq_m, "pq_bits": bits, "train_size": train}
    return index, used | {"nprobe": params.nprobe}


def _vectors(folder: Path, manifest: dict[str, Any]):
    import numpy as np

    from unimm.inference.store import part_embeddings

    return np.ascontiguousarray(torch.cat([part_embeddings(folder, p) for p in manifest["parts"]]).numpy())


def build_ann(opts: IndexOptions) -> dict[str, Any]:
    """Build the ANN index of the finished index ``opts.index`` and save it beside the embeddings;
    return its manifest (``ann.json``).

    Raises:
        UnimmError: no finished index, FAISS missing, or parameters that do not fit the data.
    """
    from unimm.inference.store import embeddings_hash, read_manifest

    folder = Path(opts.index)
    manifest = read_manifest(folder)
    index, used = faiss_index(_vectors(folder, manifest), opts)
    return _save(folder, index, opts.backend, used, embeddings_hash(folder, manifest))


def _save(folder: Path, index, backend: str, params: dict[str, Any], digest: str) -> dict[str, Any]:
    faiss = _faiss()
    target = folder / ANN_DIR
    target.mkdir(exist_ok=True)
    name = f"index-{digest[:16]}.faiss"
    blob = faiss.serialize_index(index).tobytes()
    atomic_write_bytes(target / name, blob)
    ann = {
        "kind": "unimm-ann",
        "backend": backend,
        "params": params,
        "file": name,
        "embeddings_hash": digest,
        "count": int(index.ntotal),
        "dim": int(index.d),
        "bytes": len(blob),
        "bytes_per_vector": round(len(blob) / max(1, index.ntotal), 1),
        "faiss_version": faiss.__version__,
    }
    atomic_write_json(target / ANN_MANIFEST, ann)
    for old in target.glob("index-*.faiss"):
        if old.name != name:
            old.unlink()
    return ann


def read_ann_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The saved ANN index's manifest, or None when the index has none."""
    path = Path(folder) / ANN_DIR / ANN_MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def remove_ann(folder: str | Path) -> None:
    """Delete the saved ANN index (its embeddings are being replaced)."""
    shutil.rmtree(Path(folder) / ANN_DIR, ignore_errors=True)


def _read(folder: Path, ann: dict[str, Any]):
    import numpy as np

    faiss = _faiss()
    blob = np.frombuffer((folder / ANN_DIR / ann["file"]).read_bytes(), dtype=np.uint8)
    index = faiss.deserialize_index(blob)
    _search_params(index, ann["params"])
    return index


def extend_ann(folder: str | Path, base: dict[str, Any], new_parts: list[dict[str, Any]], manifest) -> None:
    """Add the vectors of ``new_parts`` (appended to the index ``base``) to the saved ANN index;
    nothing to do when there is none.

    Raises:
        UnimmError: the ANN index was built over other embeddings than ``base``'s.
    """
    from unimm.inference.store import embeddings_hash

    folder = Path(folder)
    ann = read_ann_manifest(folder)
    if ann is None:
        return
    _check_fresh(folder, ann, embeddings_hash(folder, base))
    index = _read(folder, ann)
    index.add(_vectors(folder, {"parts": new_parts}))
    _save(folder, index, ann["backend"], ann["params"], embeddings_hash(folder, manifest))


def _check_fresh(folder: Path, ann: dict[str, Any], digest: str) -> None:
    if ann["embeddings_hash"] != digest:
        raise UnimmError(
            f"the ANN index in {folder / ANN_DIR} was built over other embeddings than the index holds "
            f"now; rebuild it: unimm index build --index {folder} --backend {ann['backend']}"
        )


class Searcher:
    """Top-k over an index with the model that embedded it: the saved ANN index when there is one
    (``backend="auto"`` or ``"ann"``), otherwise exact search over the embeddings.

    Attributes:
        rows: what each vector is (index rows, in vector order).
        manifest: the index's manifest; ``ann`` the ANN index's (None for exact search).
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        model: str | Path,
        dim: int,
        backend: str = "auto",
        instruction: str | None = None,
    ) -> None:
        """``instruction``: the task queries are encoded under; an index whose documents were
        encoded under another is refused (their vectors were not made to be compared)."""
        from unimm.inference.store import embeddings_hash, load_rows, model_hash, read_manifest

        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if self.manifest["model_hash"] != model_hash(model):
            raise UnimmError(
                f"--index {folder} was embedded with another model ({self.manifest['model']}); embed it "
                f"again with --model {model}, or use the model it was built with"
            )
        built = self.manifest.get("instruction", "")
        if instruction is not None and built != instruction:
            raise UnimmError(
                f"--index {folder}: its documents were embedded under instruction task {built!r}, the "
                f'queries\' is {instruction!r}; pass --instruction {built!r} ("" for none), or embed '
                "the documents again under this one"
            )
        self.query_dim = int(self.manifest["dim"])
        """Queries are cut to the index's size (a Matryoshka index of a shorter trained size)."""
        if dim != self.query_dim:
            from unimm.model.checkpoint import read_meta

            if self.query_dim not in read_meta(model)["inference"]["dimensions"]:
                raise UnimmError(
                    f"dimension mismatch: the model embeds in {dim}-d, the index holds {self.query_dim}-d"
                )
        self.rows = load_rows(self.folder, self.manifest)
        self.ann = read_ann_manifest(self.folder) if backend in ("auto", "ann") else None
        if backend == "ann" and self.ann is None:
            raise UnimmError(
                f"--index {folder} has no ANN index; build one: unimm index build --index {folder} "
                "--backend faiss-hnsw (or search with --backend exact)"
            )
        if self.ann is not None:
            _check_fresh(self.folder, self.ann, embeddings_hash(self.folder, self.manifest))
            self._ann_index = _read(self.folder, self.ann)
            self.embeddings = None
        else:
            self.embeddings = torch.from_numpy(_vectors(self.folder, self.manifest))

    @classmethod
    def for_session(cls, folder: str | Path, session, model: str | Path, backend: str = "auto") -> Searcher:
        """A searcher of ``folder`` for the queries ``session`` (loaded from ``model``) embeds:
        its embedding size and its instruction task."""
        return cls(
            folder, model=model, dim=session.model.head.embed_dim, backend=backend, instruction=session.task
        )

    @property
    def backend(self) -> str:
        return self.ann["backend"] if self.ann else "exact"

    @property
    def count(self) -> int:
        """Documents in the index."""
        return len(self.rows)

    def search(self, queries: torch.Tensor, k: int, *, block: int = 65536) -> list[list[tuple[int, float]]]:
        """For each query, up to ``k`` ``(row, score)`` pairs, best first (an ANN index may find
        fewer than ``k``)."""
        from unimm.inference.search import exact_search
        from unimm.model.core import truncate

        queries = truncate(queries, self.query_dim)
        if self.ann is None:
            scores, found = exact_search(queries, self.embeddings, k, block=block)
        else:
            import numpy as np

            s, r = self._ann_index.search(
                np.ascontiguousarray(queries.float().numpy()), min(k, len(self.rows))
            )
            scores, found = torch.from_numpy(s), torch.from_numpy(r).long()
        return [
            [(int(r), float(s)) for s, r in zip(qs, qr, strict=True) if r >= 0]
            for qs, qr in zip(scores.tolist(), found.tolist(), strict=True)
        ]
