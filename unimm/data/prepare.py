"""``unimm prepare``: records (any adapter format) -> WebDataset shards with teacher features.

    unimm prepare data.jsonl --out shards/ --image-size 336 --workers 2 \
        --teacher-image-expert dinov2-base --teacher-text-expert bge-base --teacher-clip clip-vit-l-14

Stages: (1) read and check every record (structure, ids, image paths) so that ``--on-error
fail`` stops before anything is written and lists every problem; (2) images are decoded,
checked and resized in a process pool, in order; (3) teacher features are computed in fixed
chunks of records (so that a resumed run batches exactly as an uninterrupted one); (4) samples
go into shards written under temporary names and renamed when complete. A journal lists the
finished shards with their sha256, so ``--resume`` keeps those and redoes the rest; the
manifest is written last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from unimm import __version__
from unimm.config import PrepareConfig, PrepareOptions, config_to_dict
from unimm.data.adapters import iter_records
from unimm.data.images import (
    EncodedImage,
    ImageProblem,
    encode_image,
    read_image_source,
    resolve_image_source,
)
from unimm.data.problems import summarize
from unimm.data.records import Record, RecordLimits
from unimm.data.shards import (
    MANIFEST_NAME,
    REJECTS_NAME,
    SCHEMA_VERSION,
    SHARD_PREFIX,
    ShardInfo,
    ShardWriter,
    shard_name,
)
from unimm.data.tables import default_image_root, input_hash, is_table, parse_columns
from unimm.errors import DataError, UnimmError
from unimm.utils import atomic_write_bytes, atomic_write_json, progress_bar, sha256_file

JOURNAL_NAME = ".prepare-journal.json"
# Records per teacher chunk. Chunks start at fixed record indices, so batch composition (and
# hence the low bits of teacher features) never depends on where a resumed run starts.
TEACHER_CHUNK = 256
# Testing hook: exit hard right after shard N is complete and shard N+1 has its first sample,
# as a kill would. Used by the resume tests; never set it yourself.
_FAULT_ENV = "UNIMM_FAULT_AFTER_SHARDS"


@dataclasses.dataclass
class PrepareResult:
    """What a prepare run produced."""

    out_dir: Path
    samples: int
    shards: int
    rejects: int
    kept_shards: int
    seconds: float


@dataclasses.dataclass
class _Pending:
    """A record that passed the structural checks, with its image files resolved."""

    record: Record
    image_files: list[str]


def write_shards(cfg: PrepareConfig, *, progress: bool = True) -> PrepareResult:
    """Prepare shards as configured; see the module docstring.

    Raises:
        UnimmError: bad input under ``on_error=fail``, an unusable output directory, a resume
            of a directory prepared from other inputs, or teachers that cannot be loaded.
    """
    opts = cfg.prepare
    start_time = time.perf_counter()
    inputs = _check_inputs(opts)
    out_dir = Path(opts.out)
    _prepare_out_dir(out_dir, opts)

    pending, rejects = _collect(inputs, opts)
    if opts.on_error == "fail" and rejects:
        raise _problems_error(rejects)

    teachers = None
    if cfg.teachers.enabled:
        from unimm.data.teachers import TeacherEncoders

        teachers = TeacherEncoders(cfg.teachers)
    input_hashes = {p: input_hash(p) for p in inputs}  # read once: fingerprint and manifest
    fingerprint = _fingerprint(inputs, input_hashes, cfg, teachers)
    kept = _resume_point(out_dir, fingerprint) if opts.resume else []
    start = kept[-1].end_record if kept else 0

    writer, journal = _open_writer(out_dir, opts, kept, fingerprint)
    try:
        new_rejects = _write_samples(writer, pending, start, opts, teachers, progress)
    except DataError as exc:  # a bad image under --on-error fail: this run leaves nothing behind
        _roll_back(out_dir, journal, len(kept))
        raise UnimmError(
            f"{exc}\nNothing was written by this run. Fix it, or pass --on-error skip to leave such "
            "records out (they are listed in rejects.jsonl)."
        ) from None

    shards = [ShardInfo(**s) for s in journal["shards"]]
    all_rejects = [r.as_reject() for r in rejects] + [r for s in kept for r in s.rejects] + new_rejects
    _write_rejects(out_dir, all_rejects)
    if not shards:
        raise UnimmError(
            f"no record could be prepared: all {len(all_rejects)} were rejected; "
            f"see {out_dir / REJECTS_NAME} for the reasons"
        )
    manifest = _manifest(inputs, input_hashes, cfg, teachers, fingerprint, shards, len(all_rejects))
    manifest["counts"]["pairs"], manifest["instructions"] = _pairs_and_instructions(pending, all_rejects)
    atomic_write_json(out_dir / MANIFEST_NAME, manifest)
    (out_dir / JOURNAL_NAME).unlink(missing_ok=True)
    return PrepareResult(
        out_dir=out_dir,
        samples=manifest["counts"]["samples"],
        shards=len(shards),
        rejects=len(all_rejects),
        kept_shards=len(kept),
        seconds=time.perf_counter() - start_time,
    )


def _pairs_and_instructions(pending: list[_Pending], rejects: list[dict]) -> tuple[int, list[str]]:
    """How many pair records the shards hold, and the instruction tasks their records name (so
    that ``train`` can check them against the recipe before it starts)."""
    rejected = {(r.get("source"), r.get("line")) for r in rejects}
    kept = [p.record for p in pending if (p.record.source, p.record.line) not in rejected]
    names = sorted({r.instruction for r in kept if r.instruction is not None})
    return sum(r.pair is not None for r in kept), names


def _roll_back(out_dir: Path, journal: dict, kept: int) -> None:
    """Remove the shards this run closed (those after the ``kept`` ones) and its journal entries."""
    for shard in journal["shards"][kept:]:
        (out_dir / shard["name"]).unlink(missing_ok=True)
    del journal["shards"][kept:]
    if kept:
        atomic_write_json(out_dir / JOURNAL_NAME, journal)
    else:
        (out_dir / JOURNAL_NAME).unlink(missing_ok=True)


def _open_writer(
    out_dir: Path, opts: PrepareOptions, kept: list[ShardInfo], fingerprint: str
) -> tuple[ShardWriter, dict]:
    """A shard writer after the ``kept`` shards whose every closed shard lands in the journal."""
    journal = {"fingerprint": fingerprint, "shards": [dataclasses.asdict(s) for s in kept]}
    if kept:  # the manifest is gone until this run finishes: the journal must list what is kept
        atomic_write_json(out_dir / JOURNAL_NAME, journal)

    def on_close(info: ShardInfo) -> None:
        journal["shards"].append(dataclasses.asdict(info))
        atomic_write_json(out_dir / JOURNAL_NAME, journal)

    writer = ShardWriter(
        out_dir,
        first_index=len(kept),
        samples_per_shard=opts.samples_per_shard,
        max_shard_bytes=opts.max_shard_bytes,
        on_close=on_close,
    )
    return writer, journal


def _write_samples(
    writer: ShardWriter, pending: list[_Pending], start: int, opts: PrepareOptions, teachers, progress: bool
) -> list[dict]:
    """Process the records from ``start`` on and write them in order; return the new rejects.

    On any error the open shard is discarded (the closed ones stay, journalled, for ``--resume``).
    """
    fault_after = int(os.environ[_FAULT_ENV]) if os.environ.get(_FAULT_ENV) else None
    new_rejects: list[dict] = []
    bar = progress_bar(
        total=len(pending),
        initial=start,
        unit="sample",
        desc="prepare",
        disable=not progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    try:
        # closing(): on an error the pool is shut down now, not when the traceback is freed.
        with contextlib.closing(_processed(pending, start, opts, teachers)) as results:
            for index, result in results:
                item = pending[index]
                if isinstance(result, DataError):
                    if opts.on_error == "fail":
                        raise result
                    new_rejects.append(result.as_reject())
                    writer.note_reject(result.as_reject(), index)
                else:
                    images, features = result
                    n_images = len(images)
                    writer.add(
                        _sample_key(index),
                        _members(item, images, features),
                        index,
                        images=n_images,
                        texts=len(item.record.slices) - n_images,
                    )
                    if fault_after is not None and writer.index == fault_after and writer.open_samples == 1:
                        os._exit(75)
                bar.update(1)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return new_rejects


# ---------------------------------------------------------------------------------------------
# Inputs and output directory


def _check_inputs(opts: PrepareOptions) -> list[Path]:
    paths = [Path(p) for p in opts.inputs]
    missing = [str(p) for p in paths if not (p.is_file() or is_table(p))]
    if missing:
        raise UnimmError(
            f"input(s) not found: {', '.join(missing)} (give record files, or folders written by "
            "datasets' save_to_disk or laid out as an imagefolder with metadata.jsonl)"
        )
    if opts.image_root is not None and not Path(opts.image_root).is_dir():
        raise UnimmError(f"--image-root {opts.image_root}: not a directory")
    parse_columns(opts.columns)  # a bad --columns fails before anything is read
    return paths


def _our_files(out_dir: Path) -> list[Path]:
    names = {MANIFEST_NAME, REJECTS_NAME, JOURNAL_NAME}
    return [
        p
        for p in out_dir.iterdir()
        if p.name in names or (p.name.startswith(SHARD_PREFIX) and p.name.endswith((".tar", ".tar.tmp")))
    ]


def _prepare_out_dir(out_dir: Path, opts: PrepareOptions) -> None:
    from unimm.outputs import claim_output

    if out_dir.exists() and not out_dir.is_dir():
        raise UnimmError(f"--out {out_dir}: exists and is not a directory; choose a directory path")
    claim_output(out_dir, "unimm-shards", [*opts.inputs, *([opts.image_root] if opts.image_root else [])])
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".unimm-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        existing = _our_files(out_dir)
    except OSError as exc:
        raise UnimmError(
            f"--out {out_dir}: cannot write there ({exc.strerror or exc}); choose a writable directory"
        ) from None
    if existing and not (opts.resume or opts.overwrite):
        raise UnimmError(
            f"--out {out_dir} already holds prepared shards; pass --resume to finish or check them, "
            "--overwrite to replace them, or choose another --out"
        )
    if opts.overwrite:
        for path in existing:
            path.unlink()
    for path in out_dir.glob(f"{SHARD_PREFIX}*.tar.tmp"):
        path.unlink()  # a shard that an interrupted run did not finish


def record_limits(opts: PrepareOptions) -> RecordLimits:
    """What one input record may hold, from the ``prepare.max_*`` options."""
    return RecordLimits(
        depth=opts.max_record_depth,
        number_digits=opts.max_number_digits,
        text_chars=opts.max_text_chars,
        slices=opts.max_slices,
    )


def _collect(inputs: list[Path], opts: PrepareOptions) -> tuple[list[_Pending], list[DataError]]:
    """Read every record, check structure, ids and image paths; nothing is decoded yet."""
    pending: list[_Pending] = []
    rejects: list[DataError] = []
    seen: dict[str, str] = {}
    columns = parse_columns(opts.columns)
    for path in inputs:
        root = Path(opts.image_root) if opts.image_root is not None else default_image_root(path)
        for item in iter_records(path, opts.format, record_limits(opts), columns=columns):
            if isinstance(item, DataError):
                rejects.append(item)
                continue
            where = f"{item.source}:{item.line}"
            if item.id in seen:
                rejects.append(
                    DataError(
                        f"duplicate id (first seen at {seen[item.id]}); ids must be unique",
                        source=item.source,
                        line=item.line,
                        record_id=item.id,
                    )
                )
                continue
            seen[item.id] = where
            try:
                files = [resolve_image_source(p, root) for p in item.image_paths]
            except ImageProblem as exc:
                rejects.append(DataError(str(exc), source=item.source, line=item.line, record_id=item.id))
                continue
            if opts.task == "generative" and item.pair is not None:
                rejects.append(
                    DataError(
                        "--set prepare.task=generative on a pair record: pairs train the alignment "
                        "only; prepare them separately",
                        source=item.source,
                        line=item.line,
                        record_id=item.id,
                    )
                )
                continue
            if opts.task != "records" and item.pair is None:
                item.task = opts.task
            pending.append(_Pending(item, files))
    return pending, rejects


def _problems_error(problems: list[DataError]) -> UnimmError:
    return UnimmError(
        f"{len(problems)} bad record(s); nothing was written:\n{summarize(problems)}\n"
        "Fix them, or pass --on-error skip to leave them out (they are listed in rejects.jsonl)."
    )


# ---------------------------------------------------------------------------------------------
# Processing


def _encode_record(task: tuple) -> tuple[int, list[EncodedImage] | str]:
    """Encode the images of one record (top-level so that a pool can pickle it)."""
    index, files, image_size, quality, verify, max_pixels, in_pool = task
    try:
        images = [
            encode_image(f, image_size=image_size, jpeg_quality=quality, verify=verify, max_pixels=max_pixels)
            for f in files
        ]
    except ImageProblem as exc:
        return index, str(exc)
    if in_pool:
        images = [dataclasses.replace(im, data=b"") if im.copied else im for im in images]
    return index, images


def _fill_copied(images: list[EncodedImage], files: list[str]) -> list[EncodedImage] | str:
    """Read the bytes of images a pool worker checked but did not send back."""
    out = []
    for image, file in zip(images, files, strict=True):
        if image.copied and not image.data:
            data = read_image_source(file)
            if len(data) != image.source_size:
                return f"image {file} changed while it was being prepared; run again"
            image = dataclasses.replace(image, data=data)
        out.append(image)
    return out


def _processed(
    pending: list[_Pending], start: int, opts: PrepareOptions, teachers
) -> Iterator[tuple[int, tuple | DataError]]:
    """Yield ``(index, (images, features) | DataError)`` for records ``start`` onwards, in order."""
    chunk_start = start - start % TEACHER_CHUNK
    in_pool = opts.workers > 1
    image_opts = (opts.image_size, opts.jpeg_quality, opts.verify_images, opts.max_image_pixels, in_pool)
    tasks = ((i, pending[i].image_files, *image_opts) for i in range(chunk_start, len(pending)))
    encoded = _map_ordered(_encode_record, tasks, opts.workers)
    while True:
        chunk = [next(encoded, None) for _ in range(TEACHER_CHUNK)]
        chunk = [c for c in chunk if c is not None]
        if not chunk:
            return
        results: dict[int, tuple | DataError] = {}
        good = []
        for index, out in chunk:
            rec = pending[index].record
            if in_pool and not isinstance(out, str):  # the pool sent copied images back without bytes
                out = _fill_copied(out, pending[index].image_files)
            if isinstance(out, str):
                results[index] = DataError(out, source=rec.source, line=rec.line, record_id=rec.id)
            else:
                good.append((index, out))
        features = _teacher_features(pending, good, teachers)
        for (index, images), feats in zip(good, features, strict=True):
            results[index] = (images, feats)
        for index, _ in chunk:
            if index >= start:
                yield index, results[index]


def _teacher_features(pending: list[_Pending], good: list, teachers) -> list:
    if teachers is None:
        return [None] * len(good)
    import io

    from PIL import Image

    samples = []
    for index, images in good:
        decoded = iter(images)
        slices = []
        for s in pending[index].record.slices:
            if s.kind == "text":
                slices.append(s.value)
            else:  # the teachers see exactly the pixels the shard stores
                slices.append(Image.open(io.BytesIO(next(decoded).data)).convert("RGB"))
        samples.append(slices)
    return teachers.encode(samples)


def _map_ordered(fn, tasks: Iterator, workers: int) -> Iterator:
    """``map`` in order over a process pool, with a bounded number of tasks in flight."""
    if workers <= 1:
        yield from map(fn, tasks)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    inflight = threading.BoundedSemaphore(workers * 16)

    def throttled():
        for task in tasks:
            inflight.acquire()
            yield task

    # Workers ignore Ctrl-C: the main process handles it once (keeps finished shards, says --resume).
    context = multiprocessing.get_context(method)
    with context.Pool(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        for result in pool.imap(fn, throttled(), chunksize=4):
            inflight.release()
            yield result


def _sample_key(index: int) -> str:
    return f"{index:09d}"


def _members(item: _Pending, images: list[EncodedImage], features) -> dict[str, bytes]:
    record = item.record
    members: dict[str, bytes] = {}
    slices = []
    encoded = iter(images)
    for n, s in enumerate(record.slices):
        if s.kind == "text":
            slices.append({"kind": "text", "text": s.value, "role": s.role})
        else:
            img = next(encoded)
            members[f"{n}.jpg"] = img.data
            slices.append(
                {
                    "kind": "image",
                    "path": str(s.value),
                    "width": img.width,
                    "height": img.height,
                    "role": s.role,
                }
            )
    header = {
        "id": record.id,
        "slices": slices,
        "response": record.response,
        # keys only when set: shards of earlier versions' records keep their bytes
        **({"task": record.task} if record.task != "both" else {}),
        **({"instruction": record.instruction} if record.instruction is not None else {}),
        **({"pair": record.pair.to_obj()} if record.pair is not None else {}),
        "meta": record.meta,
        "source": {"file": Path(record.source).name if record.source else None, "line": record.line},
    }
    members["json"] = json.dumps(header, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
    if features is not None:
        from safetensors.torch import save

        members["teacher.safetensors"] = save(features.tensors())
    return members


# ---------------------------------------------------------------------------------------------
# Resume, manifest, rejects


def _fingerprint(inputs: list[Path], input_hashes: dict, cfg: PrepareConfig, teachers) -> str:
    """Hash of everything that decides the shard bytes (not ``workers``: it changes no byte)."""
    opts = cfg.prepare
    relevant = {
        "schema_version": SCHEMA_VERSION,
        "inputs": [[p.name, input_hashes[p]] for p in inputs],
        "image_roots": [os.path.realpath(opts.image_root or default_image_root(p)) for p in inputs],
        "options": {
            k: getattr(opts, k)
            for k in (
                "format",
                "samples_per_shard",
                "max_shard_bytes",
                "image_size",
                "jpeg_quality",
                "on_error",
                "verify_images",
                "max_image_pixels",
            )
        },
        "teachers": teachers.manifest() if teachers is not None else None,
        "teacher_text_max_length": cfg.teachers.text_max_length,
        **({"task": opts.task} if opts.task != "records" else {}),  # older fingerprints unchanged
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def _resume_point(out_dir: Path, fingerprint: str) -> list[ShardInfo]:
    """Shards of an earlier run that can be kept: same fingerprint, contiguous, sha256 intact."""
    state = None
    for name in (JOURNAL_NAME, MANIFEST_NAME):
        path = out_dir / name
        if path.is_file():
            try:
                state = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                state = None
            break
    if not state:
        return []
    if state.get("fingerprint") != fingerprint:
        raise UnimmError(
            f"--resume: {out_dir} was prepared from other inputs, options or teachers; "
            "use --overwrite to replace it, or another --out"
        )
    kept: list[ShardInfo] = []
    for n, entry in enumerate(state.get("shards", [])):
        info = ShardInfo(**entry)
        path = out_dir / info.name
        if info.name != shard_name(n) or not path.is_file() or sha256_file(path) != info.sha256:
            break
        kept.append(info)
    keep = {s.name for s in kept}
    for path in out_dir.glob(f"{SHARD_PREFIX}*.tar"):
        if path.name not in keep:
            path.unlink()
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    return kept


def _write_rejects(out_dir: Path, rejects: list[dict]) -> None:
    path = out_dir / REJECTS_NAME
    if not rejects:
        path.unlink(missing_ok=True)
        return
    lines = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rejects)
    atomic_write_bytes(path, lines.encode())


def _manifest(
    inputs, input_hashes, cfg, teachers, fingerprint, shards: list[ShardInfo], n_rejects: int
) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "unimm-shards",
        "unimm_version": __version__,
        "fingerprint": fingerprint,
        "counts": {
            "samples": sum(s.samples for s in shards),
            "image_slices": sum(s.images for s in shards),
            "text_slices": sum(s.texts for s in shards),
            "shards": len(shards),
            "rejects": n_rejects,
        },
        # Each shard keeps the record range it covers and the rejects inside it: --resume needs them.
        "shards": [dataclasses.asdict(s) for s in shards],
        "teachers": teachers.manifest() if teachers is not None else None,
        "inputs": [{"file": p.name, "sha256": input_hashes[p]} for p in inputs],
        "options": {
            k: v
            for k, v in config_to_dict(cfg)["prepare"].items()
            if k not in ("inputs", "out", "resume", "overwrite", "workers")
        },
    }
