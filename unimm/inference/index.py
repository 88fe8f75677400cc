"""``unimm embed``: a checkpoint + documents (record files or prepared shards) → an embedding index.

    unimm embed --model runs/tiny/step-000200 --data shards --out index
    unimm embed --model runs/tiny/step-000200 --data captions.csv --image-root photos --out index
    unimm embed --model runs/tiny/step-000200 --data more.jsonl --out index --append

Index layout (docs/formats.md)::

    INDEX/embeddings-00000.safetensors   "embeddings" [n, d] (unit rows; float16 or float32), and with
                                         --per-slice "slice_embeddings" [s, d] + "slice_offsets" [n+1]
    INDEX/embeddings-00000.json          ids and pointers back to the content, row by row
    INDEX/manifest.json                  model hash, dim, count, dtype, parts + sha256 (written last)
    INDEX/ann/                           the saved ANN index, if built (unimm.inference.ann)

Each document is embedded as one view: the whole sample, cut after its last slice (the same
prefix as in training). Parts of ``part_size`` documents are written atomically as they fill;
``--resume`` keeps the finished ones. ``--append`` writes new parts beside the old ones
(numbered by run), then a manifest listing both: ids stay unique, the model must be the same, and
a saved ANN index gets the new vectors too.
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
from unimm.inference.store import INDEX_MANIFEST, model_hash, read_manifest
from unimm.utils import atomic_write_bytes, atomic_write_json, resolve_device


def _journal(out: Path, rank: int, world: int) -> Path:
    return out / (".embed-journal.json" if world == 1 else f".embed-journal-r{rank}.json")


def _part_name(number: int, rank: int, world: int, run: int = 0) -> str:
    """Parts of the first run are ``embeddings-NNNNN``; an ``--append`` run numbers its own."""
    stem = "embeddings" if run == 0 else f"embeddings-{run:02d}"
    return f"{stem}-{number:05d}" if world == 1 else f"{stem}-r{rank}-{number:05d}"


def _run_number(base: dict[str, Any]) -> int:
    """The number of this run's parts: 0 for a new index, else the runs the index has seen (an
    index from before runs were counted has had one)."""
    return base.get("runs", 1) if base else 0


def _check_appendable(out: Path, opts: EmbedOptions) -> dict[str, Any]:
    """The index ``--append`` adds to, after checking that the new documents would fit it."""
    if not (out / INDEX_MANIFEST).is_file():
        raise UnimmError(f"--append: {out} holds no finished index to add to; embed without --append first")
    base = read_manifest(out)
    if base["model_hash"] != model_hash(opts.model):
        raise UnimmError(
            f"--append: {out} was embedded with another model ({base['model']}); its vectors and new "
            f"ones from --model {opts.model} would not be comparable. Embed into a new --out instead"
        )
    for key, flag in (("per_slice", "--per-slice"), ("dtype", "--dtype")):
        if base[key] != getattr(opts, key):
            raise UnimmError(f"--append: {out} has {key} = {base[key]}; give the same {flag}")
    return base


def _prepare_out(out: Path, opts: EmbedOptions, rank: int = 0, world: int = 1) -> tuple[list[dict], dict]:
    """Parts of this rank to keep (resume) and the index appended to (``{}`` without --append),
    after checking the output folder."""
    from unimm.inference.ann import remove_ann
    from unimm.outputs import claim_output

    if out.exists() and not out.is_dir():
        raise UnimmError(f"--out {out}: exists and is not a directory")
    claim_output(out, "unimm-index", [*opts.data, opts.model])
    out.mkdir(parents=True, exist_ok=True)
    base = _check_appendable(out, opts) if opts.append else {}
    kept_names = {p["name"] for p in base.get("parts", [])}
    existing = [p for p in sorted(out.glob("embeddings-*")) if p.name.split(".")[0] not in kept_names]
    if existing and not (opts.resume or opts.overwrite or opts.append):
        raise UnimmError(
            f"--out {out} already holds an index; pass --append, --resume, --overwrite, or another --out"
        )
    journal = _journal(out, rank, world)
    state = json.loads(journal.read_text(encoding="utf-8")) if journal.is_file() else None
    if opts.resume and state is not None:
        if state.get("model_hash") != model_hash(opts.model) or state.get("data") != list(opts.data):
            raise UnimmError(f"--resume: {out} was embedded with another model or data; use --overwrite")
        if state.get("run", 0) != _run_number(base):
            raise UnimmError(f"--resume: the interrupted run in {out} was {'not ' * opts.append}an --append")
        return state["parts"], base
    if opts.overwrite or opts.append:  # an interrupted run's parts (or the whole index) go
        for path in [*existing, *out.glob(".embed-journal*.json")]:
            path.unlink(missing_ok=True)
        if opts.overwrite:
            (out / INDEX_MANIFEST).unlink(missing_ok=True)
            remove_ann(out)
    return [], base


class _PartWriter:
    """Collects one rank's embeddings and writes them as numbered parts, journalled for resume.

    A part (``embeddings-NNNNN.safetensors`` + its rows' ``.json``) is written atomically, then
    the journal that lists it; a killed run resumes after its last journalled part.
    """

    def __init__(
        self, out: Path, opts: EmbedOptions, rank: int, world: int, kept: list[dict], digest: str, run: int
    ) -> None:
        self.out, self.opts, self.rank, self.world, self.run = out, opts, rank, world, run
        self.storage = torch.float16 if opts.dtype == "float16" else torch.float32
        self.parts = list(kept)
        self.journal = {"model_hash": digest, "data": list(opts.data), "run": run, "parts": self.parts}
        self._clear()

    def _clear(self) -> None:
        self.emb: list[torch.Tensor] = []
        self.slices: list[torch.Tensor] = []
        self.offsets = [0]
        self.rows: list[dict] = []

    @property
    def room(self) -> int:
        return self.opts.part_size - len(self.rows)

    def add(self, session, samples: list[Sample], rows: list[dict]) -> None:
        """Embed ``samples`` (a view each, and every slice with ``--per-slice``) into the open part."""
        if self.opts.per_slice:
            per_doc = session.embed_slices(samples)
            self.emb.append(torch.stack([d[-1] for d in per_doc]))
            for d in per_doc:
                self.slices.append(d)
                self.offsets.append(self.offsets[-1] + d.shape[0])
        else:
            self.emb.append(session.embed_views(samples))
        self.rows.extend(rows)
        if self.room <= 0:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save

        if not self.rows:
            return
        name = _part_name(len(self.parts), self.rank, self.world, self.run)
        tensors = {"embeddings": torch.cat(self.emb).to(self.storage).contiguous()}
        if self.opts.per_slice:
            tensors["slice_embeddings"] = torch.cat(self.slices).to(self.storage).contiguous()
            tensors["slice_offsets"] = torch.tensor(self.offsets, dtype=torch.int64)
        data = save(tensors)
        atomic_write_bytes(self.out / f"{name}.safetensors", data)
        atomic_write_json(self.out / f"{name}.json", {"rows": self.rows})
        digest = hashlib.sha256(data).hexdigest()
        self.parts.append({"name": name, "count": len(self.rows), "sha256": digest})
        self.write_journal()
        self._clear()

    def write_journal(self) -> None:
        atomic_write_json(_journal(self.out, self.rank, self.world), self.journal)


class _UniqueIds:
    """Refuses a document whose id the index (or this run) already holds."""

    def __init__(self, out: Path, base: dict[str, Any], on_error: str) -> None:
        self.seen: set[str] = set()
        for part in base.get("parts", []):
            rows = json.loads((out / f"{part['name']}.json").read_text(encoding="utf-8"))["rows"]
            self.seen.update(r["id"] for r in rows)
        self.out, self.on_error = out, on_error

    def admit(self, sample: Sample, row: dict[str, Any], stream) -> bool:
        if row["id"] not in self.seen:
            self.seen.add(row["id"])
            return True
        problem = UnimmError(
            f"{row.get('source') or sample.url}: id {row['id']!r} is already in the index {self.out}; "
            "ids must be unique (give the document another id, or leave it out)"
        )
        if self.on_error != "skip":
            raise problem
        stream.reject(problem)
        return False


def _my_batches(stream, writer: _PartWriter, done: int, batch_size: int, ids: _UniqueIds):
    """This rank's documents (every ``world``-th) not finished before, as ``(samples, rows)``
    batches that never cross a part boundary."""
    batch: list[tuple[Sample, dict]] = []
    mine = -1
    for index, (sample, row) in enumerate(stream):
        if index % writer.world != writer.rank:
            continue  # another rank's document
        if not ids.admit(sample, row, stream):
            continue  # a repeated id, left out
        mine += 1
        if mine < done:
            continue  # finished in an earlier run
        batch.append((sample, row))
        if len(batch) == min(batch_size, writer.room):
            yield [s for s, _ in batch], [r for _, r in batch]
            batch = []
    if batch:
        yield [s for s, _ in batch], [r for _, r in batch]


def write_index(cfg: EmbedConfig, *, progress: bool = True) -> dict[str, Any]:
    """Embed every document of the data with the checkpoint; see the module docstring."""
    from unimm.data.tables import parse_columns
    from unimm.inference.documents import DocumentStream, check_sources
    from unimm.utils import progress_bar

    opts = cfg.embed
    out = Path(opts.out)
    check_sources(opts.data, opts.image_root)
    state = _distributed_state()
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    if state:  # rank 0 checks and cleans the folder first; each rank reads its own journal
        with state.main_process_first():
            kept, base = _prepare_out(out, opts, rank, world)
    else:
        kept, base = _prepare_out(out, opts)
    device = state.device if state and opts.device == "auto" else resolve_device(opts.device)
    session = _session(opts, str(device), base)
    digest = model_hash(opts.model)
    run = _run_number(base)
    writer = _PartWriter(out, opts, rank, world, kept, digest, run)
    done = sum(p["count"] for p in kept)
    stream = DocumentStream(
        opts.data,
        fmt=opts.format,
        image_root=opts.image_root,
        verify=opts.verify,
        on_error=opts.on_error,
        columns=parse_columns(opts.columns),
    )
    ids = _UniqueIds(out, base, opts.on_error)
    with progress_bar(desc="embed", unit="doc", initial=done, disable=not progress or rank != 0) as bar:
        for samples, rows in _my_batches(stream, writer, done, opts.batch_size, ids):
            writer.add(session, samples, rows)
            bar.update(len(samples))
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
        raise UnimmError(_nothing_embedded(stream))
    manifest = {
        "kind": "unimm-index",
        "unimm_version": __version__,
        "model": str(Path(opts.model).resolve()),
        "model_hash": digest,
        "dim": int(session.dim),
        "instruction": session.task,  # the task its documents were encoded under ("" = none)
        "count": base.get("count", 0) + count,
        "dtype": opts.dtype,
        "per_slice": opts.per_slice,
        "parts": [*base.get("parts", []), *parts],
        "data": [*base.get("data", []), *opts.data],
        "runs": run + 1,
        "skipped_corrupt": base.get("skipped_corrupt", 0) + stream.stats.skipped,
        "rejected": base.get("rejected", 0) + stream.rejected,
        "rejected_reasons": stream.reasons,
        "expected": _expected_count(opts.data, base),
    }
    if base:
        from unimm.inference.ann_build import extend_ann

        extend_ann(out, base, parts, manifest)
    atomic_write_json(out / INDEX_MANIFEST, manifest)
    for path in out.glob(".embed-journal*.json"):
        path.unlink()
    return manifest | {"added": count, "added_rejected": stream.rejected}


def _session(opts: EmbedOptions, device: str, base: dict):
    """The checkpoint loaded to embed at ``embed.dim`` (an index appended to keeps its size)."""
    from unimm.inference.session import Session

    session = Session.load(
        opts.model, **(opts.session_options() | {"device": device}), max_length=opts.max_length, dim=opts.dim
    )
    if base and base.get("dim") != session.dim:
        raise UnimmError(
            f"--append: the index holds {base.get('dim')}-d vectors, --dim asks for {session.dim}"
        )
    if base and base.get("instruction", "") != session.task:
        raise UnimmError(
            f"--append: the index's documents were embedded under instruction task "
            f"{base.get('instruction', '')!r}, this run's is {session.task!r}; pass --instruction "
            f'{base.get("instruction", "")!r} ("" for none)'
        )
    return session


def _nothing_embedded(stream) -> str:
    if stream.rejected:
        return f"no document was embedded: all {stream.rejected} were left out (first: {stream.reasons[0]})"
    return "no document was embedded (the data is empty)"


def _expected_count(sources: list[str], base: dict[str, Any]) -> int | None:
    """The documents the shards' manifests promise (None when a source has no manifest, such as
    a record file, or when the index appended to had no such count)."""
    from unimm.data.shards import read_manifest

    total = base.get("expected", 0) if base else 0
    if total is None:
        return None
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
