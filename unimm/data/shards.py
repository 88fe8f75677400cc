"""WebDataset shards: a deterministic writer and a streaming reader.

Layout of a prepared directory (docs/formats.md)::

    DIR/shard-000000.tar      per sample: KEY.json, KEY.N.jpg per image slice N,
    DIR/shard-000001.tar                  KEY.teacher.safetensors (u, v, modality) with teachers
    DIR/manifest.json         schema version, counts, per-shard sha256, teachers (written last)
    DIR/rejects.jsonl         records left out under --on-error skip

Plain ``webdataset.WebDataset("DIR/shard-{000000..000001}.tar")`` reads them. Writing is
byte-reproducible: members sorted within a sample, fixed mtimes, owners and modes, USTAR format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from unimm.data.samples import Sample, Slice
from unimm.errors import ShardError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
SHARD_PREFIX = "shard-"
log = logging.getLogger(__name__)


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"{SHARD_PREFIX}{index:06d}.tar"


def tar_bytes(member_sizes: Iterable[int]) -> int:
    """Bytes the members take in a tar: a 512-byte header each, data padded to 512."""
    return sum(512 + -(-n // 512) * 512 for n in member_sizes)


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header tarfile writes for a regular file with unimm's fixed metadata.

    Same bytes as ``TarInfo(name)`` with size, mode 0644, mtime 0, uid/gid 0 and empty owner
    names, ``.tobuf(USTAR_FORMAT)`` (a test checks it), built directly because ``tobuf`` is the
    slowest step of writing a shard.
    """
    encoded = name.encode("utf-8")
    if len(encoded) > 100:
        raise ValueError(f"tar member name too long for USTAR: {name!r}")
    if size >= 8**11:
        raise ValueError(f"tar member too large for USTAR: {size} bytes")
    header = bytearray(512)
    header[0 : len(encoded)] = encoded
    header[100:108] = b"0000644\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"
    header[148:156] = b"        "
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _closed_tar_size(member_bytes: int) -> int:
    """File size once closed: two zero blocks, then padding to tarfile's 10 KiB record size."""
    return -(-(member_bytes + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


@dataclasses.dataclass
class ShardInfo:
    """A finished shard: its name, sha256, sample count, size and the record range it holds."""

    name: str
    sha256: str
    samples: int
    bytes: int
    first_record: int
    end_record: int
    images: int = 0
    texts: int = 0
    rejects: list[dict] = dataclasses.field(default_factory=list)


class _HashingFile:
    """A write-only file that hashes what goes through it (so a shard is read once: never)."""

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._hash = hashlib.sha256()
        self._pos = 0

    def write(self, data: bytes) -> int:
        self._fh.write(data)
        self._hash.update(data)
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def close(self) -> str:
        self._fh.close()
        return self._hash.hexdigest()

    def discard(self) -> None:
        self._fh.close()


class ShardWriter:
    """Writes samples into numbered tar shards under temporary names, renamed when complete.

    Args:
        out_dir: destination folder.
        first_index: number of the first shard this writer creates.
        samples_per_shard: close a shard after this many samples.
        max_shard_bytes: close a shard before it would pass this size.
        on_close: called with the :class:`ShardInfo` of each finished shard.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        first_index: int = 0,
        samples_per_shard: int = 1000,
        max_shard_bytes: int = 1 << 30,
        on_close: Callable[[ShardInfo], None] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.index = first_index
        self.samples_per_shard = samples_per_shard
        self.max_shard_bytes = max_shard_bytes
        self.on_close = on_close
        self._file: _HashingFile | None = None
        # Finished shards are flushed to disk on a background thread while the next one is
        # written; finish() waits for them, so the manifest never names a shard not on disk.
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unimm-fsync")
        self._pending_syncs: list = []
        self._samples = self._images = self._texts = 0
        self._bytes = 0
        self._first_record = 0
        self._end_record = 0
        self._rejects: list[dict] = []

    @property
    def open_samples(self) -> int:
        """Samples in the shard being written."""
        return self._samples

    def add(
        self, key: str, members: dict[str, bytes], record_index: int, *, images: int = 0, texts: int = 0
    ) -> None:
        """Append one sample (``{extension: bytes}``, written as ``KEY.extension``).

        ``images`` and ``texts`` are the sample's slice counts, summed into the shard's info.
        """
        size = tar_bytes(len(b) for b in members.values())
        if self._file is not None and (
            self._samples >= self.samples_per_shard
            or _closed_tar_size(self._bytes + size) > self.max_shard_bytes
        ):
            self.close_shard()
        if self._file is None:
            self._open(record_index)
        for ext in sorted(members):
            data = members[ext]
            # Written by hand (header, data, padding) rather than through TarFile.addfile, which
            # copies in 16 KiB pieces: the bytes are the same, the writer about twice as fast.
            self._file.write(ustar_header(f"{key}.{ext}", len(data)))
            self._file.write(data)
            if len(data) % 512:
                self._file.write(b"\0" * (512 - len(data) % 512))
        self._samples += 1
        self._images += images
        self._texts += texts
        self._bytes += size
        self._end_record = record_index + 1

    def note_reject(self, row: dict, record_index: int) -> None:
        """Remember a rejected record inside the current range (kept with the shard for resume)."""
        self._rejects.append(row)
        if self._file is not None:
            self._end_record = record_index + 1

    def _open(self, record_index: int) -> None:
        self._file = _HashingFile(self._tmp_path())
        self._samples = self._images = self._texts = 0
        self._bytes = 0
        self._first_record = record_index

    def _tmp_path(self) -> Path:
        return self.out_dir / (shard_name(self.index) + ".tmp")

    def close_shard(self) -> ShardInfo | None:
        """Finish the open shard (rename it into place); return its info, or None if none was open."""
        if self._file is None:
            return None
        # End of archive as tarfile writes it: two zero blocks, padded to its 10 KiB record size.
        self._file.write(b"\0" * (_closed_tar_size(self._file.tell()) - self._file.tell()))
        digest = self._file.close()
        final = self.out_dir / shard_name(self.index)
        size = self._tmp_path().stat().st_size
        os.replace(self._tmp_path(), final)
        self._pending_syncs.append(self._syncer.submit(_fsync_path, final))
        info = ShardInfo(
            name=final.name,
            sha256=digest,
            samples=self._samples,
            bytes=size,
            first_record=self._first_record,
            end_record=self._end_record,
            images=self._images,
            texts=self._texts,
            rejects=self._rejects,
        )
        self._file = None
        self._rejects = []
        self.index += 1
        if self.on_close is not None:
            self.on_close(info)
        return info

    def finish(self) -> None:
        """Close the open shard and wait until every finished shard is on disk."""
        self.close_shard()
        for future in self._pending_syncs:
            future.result()
        self._pending_syncs = []
        self._syncer.shutdown()
        _fsync_path(self.out_dir)  # the renames themselves

    def abort(self) -> None:
        """Drop the shard being written (its temporary file is removed)."""
        if self._file is not None:
            self._file.discard()
            self._tmp_path().unlink(missing_ok=True)
        self._file = None
        self._syncer.shutdown(wait=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Reading


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Load and check ``DIR/manifest.json``.

    Raises:
        ShardError: missing, unreadable, or written by a newer unimm.
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ShardError(
            f"{directory}: no {MANIFEST_NAME}; it is not a finished `unimm prepare` output "
            "(an interrupted run can be finished with `unimm prepare ... --resume`)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: cannot read the manifest ({exc})") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ShardError(
            f"{path}: schema version {version!r} is not supported (this unimm reads <= {SCHEMA_VERSION})"
        )
    return manifest


def shard_paths(source: str | Path | list) -> list[str]:
    """Shard files of a prepared directory (from its manifest), a tar file, or a list of those."""
    if isinstance(source, (list, tuple)):
        return [p for s in source for p in shard_paths(s)]
    path = Path(source)
    if path.is_dir():
        manifest = read_manifest(path)
        return [str(path / s["name"]) for s in manifest["shards"]]
    if path.is_file():
        return [str(path)]
    raise ShardError(f"{source}: no such shard directory or file")


class ReadStats:
    """Counts of samples read and skipped by a reader (shared by its handler)."""

    def __init__(self) -> None:
        self.samples = 0
        self.skipped = 0
        self.problems: list[str] = []


class _Handler:
    """webdataset error handler: warn, count and skip (``warn``) or stop with a ShardError (``fail``)."""

    def __init__(self, on_error: str, stats: ReadStats) -> None:
        if on_error not in ("warn", "fail"):
            raise ValueError(f"on_error must be 'warn' or 'fail', got {on_error!r}")
        self.on_error = on_error
        self.stats = stats

    def __call__(self, exn: Exception) -> bool:
        message = exn.describe() if isinstance(exn, ShardError) else _describe_wds_error(exn)
        if self.on_error == "fail":
            raise ShardError(message) from exn
        self.stats.skipped += 1
        if len(self.stats.problems) < 100:
            self.stats.problems.append(message)
        log.warning("skipping a corrupt sample: %s (%d skipped so far)", message, self.stats.skipped)
        return True


def _describe_wds_error(exn: Exception) -> str:
    parts = [str(a) for a in exn.args if a is not None and not hasattr(a, "read")]
    return f"{type(exn).__name__}: {' '.join(parts)}"


class SampleError(ShardError):
    """A sample whose member cannot be decoded; names the shard and member."""

    def __init__(self, url: str, member: str, reason: str) -> None:
        self.url, self.member, self.reason = url, member, reason
        super().__init__(self.describe())

    def describe(self) -> str:
        return f"{self.url}: member {self.member}: {self.reason}"


def decode_sample(raw: dict[str, Any], *, decode_images: bool = True) -> Sample:
    """Turn the raw members of one sample into a :class:`~unimm.data.samples.Sample`.

    Image slices hold PIL images, or the JPEG bytes when ``decode_images`` is false; ``teacher``
    is ``{"u", "v", "modality"}`` tensors or ``None``.

    Raises:
        SampleError: naming the shard and member that is missing or corrupt.
    """
    key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
    if "json" not in raw:
        raise SampleError(url, f"{key}.json", "missing")
    try:
        header = json.loads(raw["json"])
        slices = [
            _decode_slice(raw, key, url, n, meta, decode_images) for n, meta in enumerate(header["slices"])
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SampleError(url, f"{key}.json", f"not a unimm sample header ({exc})") from None
    teacher = None
    if "teacher.safetensors" in raw:
        from safetensors.torch import load

        try:
            teacher = load(raw["teacher.safetensors"])
        except Exception as exc:  # safetensors raises its own error types
            raise SampleError(url, f"{key}.teacher.safetensors", f"cannot load ({exc})") from None
        if teacher["v"].shape[0] != len(slices):
            raise SampleError(url, f"{key}.teacher.safetensors", "row count differs from the slice count")
    pair = None
    if header.get("pair") is not None:
        from unimm.data.records import PairSides

        try:
            pair = PairSides.from_obj(header["pair"])
        except (ValueError, KeyError, TypeError) as exc:
            raise SampleError(url, f"{key}.json", f"bad pair header ({exc})") from None
        if sum(pair.counts) != len(slices):
            raise SampleError(url, f"{key}.json", "the pair's side counts differ from the slice count")
    return Sample(
        key=key,
        slices=slices,
        id=header.get("id"),
        response=header.get("response"),
        task=header.get("task", "both"),
        pair=pair,
        instruction_name=header.get("instruction"),
        meta=header.get("meta"),
        source=header.get("source"),
        url=url,
        teacher=teacher,
    )


def _decode_slice(raw: dict[str, Any], key: str, url: str, n: int, meta: dict, decode_images: bool) -> Slice:
    role = meta.get("role", "user")
    if meta["kind"] != "image":
        return Slice(meta["kind"], text=meta.get("text"), role=role)
    member = f"{n}.jpg"
    if member not in raw:
        raise SampleError(url, f"{key}.{member}", "missing")
    image = _decode_jpeg(raw[member], url, f"{key}.{member}") if decode_images else raw[member]
    return Slice("image", image=image, role=role, width=meta.get("width"), height=meta.get("height"))


def decode_images_in(samples: list[Sample]) -> tuple[list[Sample], list[str]]:
    """Decode the JPEG bytes of samples read with ``decode_images=False``.

    Returns:
        ``(kept, problems)``: the samples with PIL images, without those holding an undecodable
        image, and one message per sample left out (naming its shard and member).
    """
    kept, problems = [], []
    for sample in samples:
        try:
            slices = [
                dataclasses.replace(item, image=_decode_jpeg(item.image, sample.url, f"{sample.key}.{n}.jpg"))
                if item.kind == "image" and isinstance(item.image, bytes)
                else item
                for n, item in enumerate(sample.slices)
            ]
        except SampleError as exc:
            problems.append(exc.describe())
            continue
        kept.append(sample.replace(slices=slices))
    return kept, problems


def _decode_jpeg(data: bytes, url: str, member: str):
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB") if img.mode != "RGB" else img
    except Exception as exc:  # Pillow raises several unrelated types for bad bytes
        raise SampleError(url, member, f"cannot decode image ({exc})") from None


def _seeded_shuffle(bufsize: int, seed: int, per_worker: bool) -> Callable[[Iterator], Iterator]:
    """A buffer shuffle whose RNG is seeded per (seed, node[, worker]), decided when iterated.

    ``per_worker`` is false when every DataLoader worker reads the same samples (and must see
    them in the same order).
    """

    def stage(src: Iterator) -> Iterator:
        import webdataset as wds

        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{seed}/{rank}/{worker if per_worker else 0}")
        buf: list = []
        for sample in src:
            buf.append(sample)
            if len(buf) >= bufsize:
                k = rng.randrange(len(buf))
                buf[k], buf[-1] = buf[-1], buf[k]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    return stage


def _manifest_entries(urls: list[str]) -> dict[str, dict[str, Any]]:
    """``{url: its manifest entry}`` for the shards whose directory has a manifest."""
    entries: dict[str, dict[str, Any]] = {}
    for folder in {str(Path(url).parent) for url in urls}:
        if (Path(folder) / "manifest.json").is_file():
            for shard in read_manifest(folder).get("shards", []):
                entries[str(Path(folder) / shard["name"])] = shard
    return entries


class _TarSamples:
    """webdataset's ``tarfile_to_samples`` with the shards opened through the verifying stage."""

    def __init__(self, opener, handler) -> None:
        self.opener, self.handler = opener, handler

    def __call__(self, sources):
        from webdataset.tariterators import group_by_keys, tar_file_expander

        files = tar_file_expander(self.opener(sources), handler=self.handler)
        return group_by_keys(files, handler=self.handler)


def read_samples(
    source: str | Path | list,
    *,
    shuffle_shards: bool = False,
    shuffle_buffer: int = 0,
    seed: int = 0,
    split_by_node: bool = True,
    split_by_worker: bool = True,
    on_error: str = "warn",
    decode_images: bool = True,
    stats: ReadStats | None = None,
    verify: str = "full",
):
    """A WebDataset pipeline of decoded samples (see :func:`decode_sample`).

    Stages, in order: shard list -> seeded shard shuffle -> split by node -> split by worker ->
    tar to samples -> seeded sample shuffle -> decode. A corrupt sample is skipped with a warning
    naming its shard and member and counted in ``stats`` (``on_error="warn"``), or stops the
    read with a :class:`ShardError` (``on_error="fail"``).

    Args:
        source: a prepared directory, a shard file, or a list of them.
        shuffle_shards: shuffle the shard order (same order on every node for a given seed).
        shuffle_buffer: sample shuffle buffer size; 0 keeps the stored order.
        seed: seeds both shuffles.
        split_by_node: give each distributed rank its own shards.
        split_by_worker: give each DataLoader worker its own shards.
        on_error: ``warn`` (skip and count) or ``fail``.
        decode_images: decode JPEG members to PIL images (else keep the bytes).
        stats: receives the counts.
        verify: check each shard against its manifest as it is read: ``full`` (size, and sha256
            streamed), ``size`` or ``off`` (:mod:`unimm.data.verify`).
    """
    import webdataset as wds

    from unimm.data.verify import VerifiedShards

    urls = shard_paths(source)
    stats = stats if stats is not None else ReadStats()
    handler = _Handler(on_error, stats)
    stages: list = [wds.SimpleShardList(urls)]
    if shuffle_shards:
        stages.append(wds.detshuffle(bufsize=max(1, len(urls)), initial=max(1, len(urls)), seed=seed))
    if split_by_node:
        stages.append(wds.split_by_node)
    if split_by_worker:
        stages.append(wds.split_by_worker)
    stages.append(_TarSamples(VerifiedShards(_manifest_entries(urls), verify), handler))
    if shuffle_buffer > 0:
        stages.append(_seeded_shuffle(shuffle_buffer, seed, per_worker=split_by_worker))
    stages.append(_decode_stage(handler, stats, decode_images))
    return wds.DataPipeline(*stages)


def _decode_stage(handler: _Handler, stats: ReadStats, decode_images: bool) -> Callable[[Iterator], Iterator]:
    def stage(src: Iterator) -> Iterator:
        for raw in src:
            try:
                sample = decode_sample(raw, decode_images=decode_images)
            except SampleError as exc:
                if handler(exc):
                    continue
                break
            stats.samples += 1
            yield sample

    return stage
