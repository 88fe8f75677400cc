"""An index on disk, read: its manifest, vectors and rows (the writer is
:mod:`unimm.inference.index`, the saved ANN index :mod:`unimm.inference.ann`; docs/formats.md).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unimm.errors import UnimmError
from unimm.utils import read_safetensors

INDEX_MANIFEST = "manifest.json"


def model_hash(checkpoint: str | Path) -> str:
    """Identifies a checkpoint's embedding space: sha256 of its head, its unimm.json and config.json."""
    folder = Path(checkpoint)
    digest = hashlib.sha256()
    for name in ("retrieval_head.safetensors", "unimm.json", "config.json"):
        path = folder / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a finished index.

    Raises:
        UnimmError: the folder holds no finished index.
    """
    path = Path(folder) / INDEX_MANIFEST
    if not path.is_file():
        raise UnimmError(
            f"index {folder}: no {INDEX_MANIFEST}; build one with `unimm embed` (or finish it with --resume)"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def load_index(folder: str | Path) -> tuple[torch.Tensor, list[dict], dict]:
    """Read an index: ``(embeddings [n, d] float32, rows, manifest)``.

    Raises:
        UnimmError: the folder is not a finished index.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    embeddings = [part_embeddings(folder, part) for part in manifest["parts"]]
    return torch.cat(embeddings), load_rows(folder, manifest), manifest


def load_rows(folder: str | Path, manifest: dict[str, Any]) -> list[dict]:
    """The rows of an index (what each vector is), in vector order."""
    rows: list[dict] = []
    for part in manifest["parts"]:
        rows.extend(json.loads((Path(folder) / f"{part['name']}.json").read_text(encoding="utf-8"))["rows"])
    return rows


def part_starts(parts: list[dict[str, Any]]) -> list[int]:
    """The first row of each part, and the count of rows after the last."""
    return list(itertools.accumulate((int(p["count"]) for p in parts), initial=0))


class IndexRows(Sequence):
    """The rows of an index (what each vector is), in vector order, read a part at a time when
    asked for: the rows of a 10 M document index, as Python objects, would take gigabytes and
    minutes to read at start; a search needs a few. The last ``keep`` parts read stay cached."""

    def __init__(self, folder: str | Path, manifest: dict[str, Any], keep: int = 16) -> None:
        self.folder, self.parts = Path(folder), manifest["parts"]
        self.starts = part_starts(self.parts)
        self.part = functools.lru_cache(maxsize=keep)(self._read_part)
        """``part(number)``: the rows of one part (cached)."""

    def _read_part(self, number: int) -> list[dict]:
        name = self.parts[number]["name"]
        return json.loads((self.folder / f"{name}.json").read_text(encoding="utf-8"))["rows"]

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} of an index of {len(self)}")
        number = bisect.bisect_right(self.starts, row) - 1
        return self.part(number)[row - self.starts[number]]

    def __iter__(self):
        for number in range(len(self.parts)):
            yield from self._read_part(number)


_SAFETENSORS_DTYPES = {"F16": "float16", "F32": "float32", "BF16": None}


class MappedVectors:
    """The stored embeddings of chosen rows, read through a memory map of each part's file (the
    safetensors layout: an 8-byte header length, a JSON header, the raw tensor), so that a few
    rows of a 10 M vector index cost a few page reads, not the index in memory."""

    def __init__(self, folder: str | Path, manifest: dict[str, Any], keep: int = 128) -> None:
        self.folder, self.parts = Path(folder), manifest["parts"]
        self.dim = int(manifest["dim"])
        self.starts = np.asarray(part_starts(self.parts))
        # each map holds a file descriptor: a 10 M index has a thousand parts, a process 1024 fds
        self.part = functools.lru_cache(maxsize=keep)(self._map)
        """``part(number)``: that part's embeddings, mapped ``[count, d]`` (the last ``keep`` kept)."""

    def _map(self, number: int) -> np.ndarray:
        part = self.parts[number]
        path = self.folder / f"{part['name']}.safetensors"
        try:
            with path.open("rb") as file:
                length = int.from_bytes(file.read(8), "little")
                header = json.loads(file.read(length))
            info = header["embeddings"]
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
            expected = (int(part["count"]), self.dim)
            if dtype is None or shape != expected or path.stat().st_size < 8 + length + end:
                raise ValueError("not the part the manifest describes")
        except FileNotFoundError:
            raise UnimmError(f"{path}: missing (index); the folder is incomplete") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UnimmError(
                f"{path}: not a readable part of this index ({exc}); embed the index again"
            ) from None
        return np.memmap(path, dtype=dtype, mode="r", offset=8 + length + begin, shape=shape)

    def gather(self, rows: np.ndarray) -> torch.Tensor:
        """The float32 vectors of ``rows`` (any shape of row numbers; the result adds ``d``)."""
        flat = np.asarray(rows, dtype=np.int64).ravel()
        numbers = np.searchsorted(self.starts, flat, side="right") - 1
        out = None
        for number in np.unique(numbers):
            where = numbers == number
            vectors = self.part(int(number))[flat[where] - self.starts[number]]
            if out is None:
                out = np.empty((len(flat), vectors.shape[1]), dtype=np.float32)
            out[where] = vectors
        if out is None:  # no rows asked for
            out = np.empty((0, self.dim), dtype=np.float32)
        return torch.from_numpy(out.reshape(*np.shape(rows), out.shape[1]))


def part_embeddings(folder: Path, part: dict[str, Any]) -> torch.Tensor:
    return read_safetensors(folder / f"{part['name']}.safetensors", "index")["embeddings"].float()


def embeddings_hash(folder: str | Path, manifest: dict[str, Any]) -> str:
    """Identifies an index's vectors: sha256 over its parts' sha256 (read from the manifest;
    hashed from the files for an index written before parts carried theirs)."""
    digest = hashlib.sha256()
    for part in manifest["parts"]:
        own = (
            part.get("sha256")
            or hashlib.sha256((Path(folder) / f"{part['name']}.safetensors").read_bytes()).hexdigest()
        )
        digest.update(f"{part['name']}:{own}\n".encode())
    return digest.hexdigest()


def load_slice_embeddings(folder: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slice embeddings of an index built with ``--per-slice``: ``(slices [S, d], offsets [n + 1])``.

    Document ``i``'s slices are rows ``offsets[i]:offsets[i + 1]``.

    Raises:
        UnimmError: the index has no per-slice embeddings.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not manifest.get("per_slice"):
        raise UnimmError(f"index {folder} has no per-slice embeddings; embed it again with --per-slice")
    slices, offsets, base = [], [torch.zeros(1, dtype=torch.int64)], 0
    for part in manifest["parts"]:
        tensors = read_safetensors(folder / f"{part['name']}.safetensors", "index")
        slices.append(tensors["slice_embeddings"].float())
        offsets.append(tensors["slice_offsets"][1:] + base)
        base += int(tensors["slice_offsets"][-1])
    return torch.cat(slices), torch.cat(offsets)
