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
  vector at 8 bits): memory for 1 M+ vectors, approximate scores; its inverted lists are mapped
  from the file when searched, not read (a 10 M × 256 index opens in a moment).

Building (a part of the embeddings at a time, resumable) is :mod:`unimm.inference.ann_build`.
Document rows are read a part at a time when a search finds them
(:class:`unimm.inference.store.IndexRows`), not all at start.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from unimm.errors import UnimmError

BACKENDS = ("faiss-flat", "faiss-hnsw", "faiss-ivfpq")
ANN_DIR = "ann"
ANN_MANIFEST = "ann.json"


def _faiss():
    try:
        import faiss
    except ImportError:
        raise UnimmError('ANN indexes need FAISS: pip install "unimm[faiss]" (or faiss-gpu)') from None
    return faiss


def search_params(index, params: dict[str, Any]) -> None:
    """Apply the searching parameters (HNSW breadth, IVF lists probed) to a read index."""
    if "ef_search" in params:
        index.hnsw.efSearch = params["ef_search"]
    if "nprobe" in params:
        index.nprobe = params["nprobe"]


def part_vectors(folder: Path, part: dict[str, Any]):
    """One part's embeddings as float32 numpy ``[count, d]`` (what FAISS takes)."""
    import numpy as np

    from unimm.inference.store import part_embeddings

    return np.ascontiguousarray(part_embeddings(folder, part).numpy())


def _vectors(folder: Path, manifest: dict[str, Any]):
    """Every vector of the index (exact search holds them all)."""
    import numpy as np

    return np.concatenate([part_vectors(folder, p) for p in manifest["parts"]])


def read_ann_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The saved ANN index's manifest, or None when the index has none."""
    path = Path(folder) / ANN_DIR / ANN_MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def remove_ann(folder: str | Path) -> None:
    """Delete the saved ANN index (its embeddings are being replaced)."""
    shutil.rmtree(Path(folder) / ANN_DIR, ignore_errors=True)


MAP_FROM_BYTES = 256 * 2**20
"""Index files at least this large are mapped for search, smaller ones read whole: reading a
small one takes milliseconds and its searches run faster from memory (1.15× at 1 M × 32 bytes,
3× at 20 000; `unimm bench index`), a large one opens at once mapped."""


def open_ann(folder: str | Path, ann: dict[str, Any], *, mapped: bool | None = None):
    """The saved FAISS index of ``folder``. Mapped (by default when its file is at least
    :data:`MAP_FROM_BYTES`): an IVF index's inverted lists are mapped from the file, read-only,
    the pages the searches touch read when touched, so a 10 M document index opens in a moment
    and its lists need not fit in memory; unmapped: read whole (to be added to, or small)."""
    faiss = _faiss()
    path = Path(folder) / ANN_DIR / ann["file"]
    if mapped is None:
        mapped = path.stat().st_size >= MAP_FROM_BYTES
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mapped else 0)
    search_params(index, ann["params"])
    return index


def check_fresh(folder: Path, ann: dict[str, Any], digest: str) -> None:
    if ann["embeddings_hash"] != digest:
        raise UnimmError(
            f"the ANN index in {folder / ANN_DIR} was built over other embeddings than the index holds "
            f"now; rebuild it: unimm index build --index {folder} --backend {ann['backend']}"
        )


def search_ann(
    index, queries: torch.Tensor, k: int, stored=None, rerank: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A FAISS index's top ``k`` of float32 ``queries`` (row -1: not found). With ``rerank`` > 1
    and ``stored`` (:class:`~unimm.inference.store.MappedVectors`), its top ``rerank·k`` are
    re-scored with the stored vectors (the scores exact search gives) and the best ``k`` kept:
    PQ codes rank near neighbours approximately, the stored vectors exactly."""
    import numpy as np

    refine = stored is not None and rerank > 1
    wanted = max(k, min(k * rerank, index.ntotal)) if refine else k
    s, r = index.search(np.ascontiguousarray(queries.numpy()), wanted)
    scores, found = torch.from_numpy(s), torch.from_numpy(r).long()
    if not refine:
        return scores, found
    vectors = stored.gather(found.clamp(min=0).numpy())  # [q, wanted, d]
    exact = torch.einsum("qd,qcd->qc", queries, vectors).masked_fill(found < 0, -torch.inf)
    # best first; among equal scores the lower row, as exact search orders them
    order = torch.from_numpy(np.lexsort((found.numpy(), -exact.numpy()), axis=1)[:, :k])
    return exact.gather(1, order), found.gather(1, order)


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
        from unimm.inference.store import IndexRows, embeddings_hash, model_hash, read_manifest

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
        self.rows = IndexRows(self.folder, self.manifest)
        self.ann = read_ann_manifest(self.folder) if backend in ("auto", "ann") else None
        if backend == "ann" and self.ann is None:
            raise UnimmError(
                f"--index {folder} has no ANN index; build one: unimm index build --index {folder} "
                "--backend faiss-hnsw (or search with --backend exact)"
            )
        self.rerank, self._stored = 0, None
        """``rerank``: candidates per result re-scored exactly from the stored vectors (IVF-PQ)."""
        if self.ann is not None:
            check_fresh(self.folder, self.ann, embeddings_hash(self.folder, self.manifest))
            self._ann_index = open_ann(self.folder, self.ann)
            self.embeddings = None
            self.rerank = int(self.ann["params"].get("rerank", 0))
            if self.rerank > 1:
                from unimm.inference.store import MappedVectors

                self._stored = MappedVectors(self.folder, self.manifest)
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
            scores, found = search_ann(
                self._ann_index, queries.float(), min(k, len(self.rows)), self._stored, self.rerank
            )
        return [
            [(int(r), float(s)) for s, r in zip(qs, qr, strict=True) if r >= 0]
            for qs, qr in zip(scores.tolist(), found.tolist(), strict=True)
        ]
