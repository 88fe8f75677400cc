"""``unimm embed``: a checkpoint + shards (or records) → an embedding index.

    unimm embed --model runs/tiny/step-000200 --data shards --out index

Index layout (docs/formats.md)::

    INDEX/embeddings-00000.safetensors   "embeddings" [n, d] (unit rows; float16 or float32), and with
                                         --per-slice "slice_embeddings" [s, d] + "slice_offsets" [n+1]
    INDEX/embeddings-00000.json          ids and pointers back to the content, row by row
    INDEX/manifest.json                  model hash, dim, count, dtype, parts (written last)

Each document is embedded as one view: the whole sample, cut after its last slice (the same
prefix as in training). Parts of ``part_size`` documents are written atomically as they fill;
``--resume`` keeps the finished ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from unimm import __version__
from unimm.config import EmbedConfig, EmbedOptions
from unimm.data.samples import Sample
from unimm.errors import UnimmError
from unimm.utils import atomic_write_bytes, atomic_write_json, read_safetensors, resolve_device

INDEX_MANIFEST = "manifest.json"
PART = "embeddings-{:05d}"


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


def _journal(out: Path, rank: int, world: int) -> Path:
    return out / (".embed-journal.json" if world == 1 else f".embed-journal-r{rank}.json")


def _part_name(number: int, rank: int, world: int) -> str:
    return PART.format(number) if world == 1 else f"embeddings-r{rank}-{number:05d}"


def _prepare_out(out: Path, opts: EmbedOptions, rank: int = 0, world: int = 1) -> list[dict]:
    """Parts of this rank to keep (resume), after checking the output folder."""
    from unimm.outputs import claim_output

    if out.exists() and not out.is_dir():
        raise UnimmError(f"--out {out}: exists and is not a directory")
    claim_output(out, "unimm-index", [*opts.data, opts.model])
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("embeddings-*"))
    if existing and not (opts.resume or opts.overwrite):
        raise UnimmError(f"--out {out} already holds an index; pass --resume, --overwrite, or another --out")
    if opts.overwrite:
        for path in [*existing, out / INDEX_MANIFEST, *out.glob(".embed-journal*.json")]:
            path.unlink(missing_ok=True)
        return []
    journal = _journal(out, rank, world)
    if opts.resume and journal.is_file():
        state = json.loads(journal.read_text(encoding="utf-8"))
        if state.get("model_hash") != model_hash(opts.model) or state.get("data") != list(opts.data):
            raise UnimmError(f"--resume: {out} was embedded with another model or data; use --overwrite")
        return state["parts"]
    return []


class _PartWriter:
    """Collects one rank's embeddings and writes them as numbered parts, journalled for resume.

    A part (``embeddings-NNNNN.safetensors`` + its rows' ``.json``) is written atomically, then
    the journal that lists it; a killed run resumes after its last journalled part.
    """

    def __init__(
        self, out: Path, opts: EmbedOptions, rank: int, world: int, kept: list[dict], digest: str
    ) -> None:
        self.out, self.opts, self.rank, self.world = out, opts, rank, world
        self.storage = torch.float16 if opts.dtype == "float16" else torch.float32
        self.parts = list(kept)
        self.journal = {"model_hash": digest, "data": list(opts.data), "parts": self.parts}
        self._clear()

    def _clear(self) -> None:
        self.emb: list[torch.Tensor] = []
        self.slices: list[torch.Tensor] = []
        self.offsets = [0]
        self.rows: list[dict] = []

    @property
    def room(self) -> int:
        return self.opts.part_size - len(self.rows)

    def add(self, session, samples: list[Sample]) -> None:
        """Embed ``samples`` (a view each, and every slice with ``--per-slice``) into the open part."""
        if self.opts.per_slice:
            per_doc = session.embed_slices(samples)
            self.emb.append(torch.stack([d[-1] for d in per_doc]))
            for d in per_doc:
                self.slices.append(d)
                self.offsets.append(self.offsets[-1] + d.shape[0])
        else:
            self.emb.append(session.embed_views(samples))
        self.rows.extend(
            {"id": s.id, "shard": Path(s.url).name, "key": s.key, "source": s.source} for s in samples
        )
        if self.room <= 0:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save

        if not self.rows:
            return
        name = _part_name(len(self.parts), self.rank, self.world)
        tensors = {"embeddings": torch.cat(self.emb).to(self.storage).contiguous()}
        if self.opts.per_slice:
            tensors["slice_embeddings"] = torch.cat(self.slices).to(self.storage).contiguous()
            tensors["slice_offsets"] = torch.tensor(self.offsets, dtype=torch.int64)
        atomic_write_bytes(self.out / f"{name}.safetensors", save(tensors))
        atomic_write_json(self.out / f"{name}.json", {"rows": self.rows})
        self.parts.append({"name": name, "count": len(self.rows)})
        self.write_journal()
        self._clear()

    def write_journal(self) -> None:
        atomic_write_json(_journal(self.out, self.rank, self.world), self.journal)


def _my_batches(stream, writer: _PartWriter, done: int, batch_size: int):
    """This rank's documents (every ``world``-th) not finished before, in batches that never
    cross a part boundary."""
    batch: list[Sample] = []
    mine = -1
    for index, sample in enumerate(stream):
        if index % writer.world != writer.rank:
            continue  # another rank's document
        mine += 1
        if mine < done:
            continue  # finished in an earlier run
        batch.append(sample)
        if len(batch) == min(batch_size, writer.room):
            yield batch
            batch = []
    if batch:
        yield batch


def write_index(cfg: EmbedConfig, *, progress: bool = True) -> dict[str, Any]:
    """Embed every sample of the data with the checkpoint; see the module docstring."""
    from tqdm import tqdm

    from unimm.data.shards import ReadStats, read_samples, shard_paths
    from unimm.inference.session import Session

    opts = cfg.embed
    out = Path(opts.out)
    state = _distributed_state()
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    if state:  # rank 0 checks and cleans the folder first; each rank reads its own journal
        with state.main_process_first():
            kept = _prepare_out(out, opts, rank, world)
    else:
        kept = _prepare_out(out, opts)
    device = state.device if state and opts.device == "auto" else resolve_device(opts.device)
    session = Session.load(
        opts.model,
        device=str(device),
        dtype=opts.model_dtype,
        max_length=opts.max_length,
        attn_implementation=opts.attn_implementation,
    )
    for source in opts.data:
        shard_paths(source)  # clear error for a missing or unfinished directory
    digest = model_hash(opts.model)
    writer = _PartWriter(out, opts, rank, world, kept, digest)
    done = sum(p["count"] for p in kept)
    stats = ReadStats()
    stream = (
        s
        for source in opts.data
        for s in read_samples(
            source, split_by_node=False, split_by_worker=False, stats=stats, verify=opts.verify
        )
    )
    with tqdm(desc="embed", unit="doc", initial=done, disable=not progress or rank != 0) as bar:
        for batch in _my_batches(stream, writer, done, opts.batch_size):
            writer.add(session, batch)
            bar.update(len(batch))
    writer.flush()
    writer.write_journal()
    parts = writer.parts
    if state:
        state.wait_for_everyone()
        if rank != 0:
            return {"main": False}
        parts = []
        for other in range(world):  # every rank's parts, in rank order
            path = _journal(out, other, world)
            parts.extend(json.loads(path.read_text(encoding="utf-8"))["parts"])
    count = sum(p["count"] for p in parts)
    if count == 0:
        raise UnimmError("no document was embedded (the data is empty)")
    manifest = {
        "kind": "unimm-index",
        "unimm_version": __version__,
        "model": str(Path(opts.model).resolve()),
        "model_hash": digest,
        "dim": int(session.model.head.embed_dim),
        "count": count,
        "dtype": opts.dtype,
        "per_slice": opts.per_slice,
        "parts": parts,
        "data": list(opts.data),
        "skipped_corrupt": stats.skipped,
        "expected": _expected_count(opts.data),
    }
    atomic_write_json(out / INDEX_MANIFEST, manifest)
    for path in out.glob(".embed-journal*.json"):
        path.unlink()
    return manifest


def _expected_count(sources: list[str]) -> int | None:
    """The documents the shards' manifests promise (None when a source has no manifest)."""
    from unimm.data.shards import read_manifest

    total = 0
    for source in sources:
        if not (Path(source) / "manifest.json").is_file():
            return None
        total += int(read_manifest(source)["counts"]["samples"])
    return total


def _distributed_state():
    """accelerate's process state when launched with several processes (torchrun, accelerate launch)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def load_index(folder: str | Path) -> tuple[torch.Tensor, list[dict], dict]:
    """Read an index: ``(embeddings [n, d] float32, rows, manifest)``.

    Raises:
        UnimmError: the folder is not a finished index.
    """
    folder = Path(folder)
    path = folder / INDEX_MANIFEST
    if not path.is_file():
        raise UnimmError(
            f"index {folder}: no {INDEX_MANIFEST}; build one with `unimm embed` (or finish it with --resume)"
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    embeddings, rows = [], []
    for part in manifest["parts"]:
        embeddings.append(
            read_safetensors(folder / f"{part['name']}.safetensors", "index")["embeddings"].float()
        )
        rows.extend(json.loads((folder / f"{part['name']}.json").read_text(encoding="utf-8"))["rows"])
    return torch.cat(embeddings), rows, manifest


def load_slice_embeddings(folder: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slice embeddings of an index built with ``--per-slice``: ``(slices [S, d], offsets [n + 1])``.

    Document ``i``'s slices are rows ``offsets[i]:offsets[i + 1]``.

    Raises:
        UnimmError: the index has no per-slice embeddings.
    """
    folder = Path(folder)
    manifest = json.loads((folder / INDEX_MANIFEST).read_text(encoding="utf-8"))
    if not manifest.get("per_slice"):
        raise UnimmError(f"index {folder} has no per-slice embeddings; embed it again with --per-slice")
    slices, offsets, base = [], [torch.zeros(1, dtype=torch.int64)], 0
    for part in manifest["parts"]:
        tensors = read_safetensors(folder / f"{part['name']}.safetensors", "index")
        slices.append(tensors["slice_embeddings"].float())
        offsets.append(tensors["slice_offsets"][1:] + base)
        base += int(tensors["slice_offsets"][-1])
    return torch.cat(slices), torch.cat(offsets)
