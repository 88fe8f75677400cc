"""The documents of an index: read from prepared shards or straight from record files, each with
the index row that finds it again (for chat's retrieval-augmented answers and the server).

A row of a shard document names its shard and key (the document is read back from the shard);
a row of a record document carries the record itself, its image paths resolved and confined as
``unimm prepare`` does, so the record file need not be read again.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from unimm.data.samples import Sample, Slice
from unimm.errors import UnimmError


def is_shards(source: str | Path) -> bool:
    """Whether ``source`` is prepared shards (a directory or a ``.tar`` file) rather than records."""
    path = Path(source)
    return path.is_dir() or path.suffix == ".tar"


def check_sources(sources: list[str], image_root: str | None) -> None:
    """Fail early, naming the source, for a missing input or an unfinished shard directory.

    Raises:
        UnimmError: a source or ``image_root`` that cannot be read.
    """
    from unimm.data.shards import shard_paths

    if image_root is not None and not Path(image_root).is_dir():
        raise UnimmError(f"--image-root {image_root}: not a directory")
    for source in sources:
        if is_shards(source):
            shard_paths(source)
        elif not Path(source).is_file():
            raise UnimmError(
                f"--data {source}: no such file or directory (give record files or prepared shard folders)"
            )


class DocumentStream:
    """``(sample, row)`` for every document of ``sources``, in order, one at a time.

    Args:
        sources: prepared shard folders/files and record files (any ``unimm prepare`` format).
        fmt: the record files' format (``auto`` detects it per file).
        image_root: the folder record image paths are relative to and confined to (default: each
            file's folder).
        verify: how shards are checked against their manifest (``data.verify``).
        on_error: ``fail`` stops at the first bad record or image; ``skip`` leaves it out and
            counts it in ``rejected`` (the first few reasons in ``reasons``).
    """

    KEEP_REASONS = 20

    def __init__(
        self,
        sources: list[str],
        *,
        fmt: str = "auto",
        image_root: str | None = None,
        verify: str = "full",
        on_error: Literal["fail", "skip"] = "fail",
    ) -> None:
        from unimm.data.shards import ReadStats

        self.sources, self.fmt, self.image_root = sources, fmt, image_root
        self.verify, self.on_error = verify, on_error
        self.stats = ReadStats()
        self.rejected = 0
        self.reasons: list[str] = []

    def reject(self, error: UnimmError) -> None:
        """Count ``error``'s document as left out (keeping the first reasons)."""
        self.rejected += 1
        if len(self.reasons) < self.KEEP_REASONS:
            self.reasons.append(str(error))

    def __iter__(self) -> Iterator[tuple[Sample, dict[str, Any]]]:
        from unimm.data.adapters import iter_decoded_records
        from unimm.data.shards import read_samples

        for source in self.sources:
            if is_shards(source):
                for s in read_samples(
                    source, split_by_node=False, split_by_worker=False, stats=self.stats, verify=self.verify
                ):
                    _refuse_pair(s)
                    yield s, {"id": s.id, "shard": Path(s.url).name, "key": s.key, "source": s.source}
                continue
            on_error = self.reject if self.on_error == "skip" else None
            for record, sample in iter_decoded_records(source, self.fmt, self.image_root, on_error=on_error):
                _refuse_pair(sample)
                slices = [{"kind": s.kind, "value": s.value, "role": s.role} for s in record.slices]
                yield sample, {"id": record.id, "source": sample.source, "slices": slices}


def _refuse_pair(sample: Sample) -> None:
    if sample.pair is not None:
        raise UnimmError(
            f"{sample.source or sample.url}: record {sample.id!r} is a pair record (query, positive, "
            "negatives): training data, not a document to index; give the corpus's documents "
            "(`unimm mine` reads pair records against an index of them)"
        )


def load_document(row: dict[str, Any], data_dirs: list[str]) -> Sample:
    """The document behind an index row, images opened: from the record the row carries, or read
    back from its shard (looked for in ``data_dirs``, the index's shard sources).

    Raises:
        UnimmError: the shard or an image is no longer where it was.
    """
    from unimm.data.adapters import open_image

    if "slices" in row:
        slices = [
            Slice.of_text(s["value"], s["role"])
            if s["kind"] == "text"
            else Slice.of_image(open_image(s["value"]), s["role"])
            for s in row["slices"]
        ]
        return Sample(key=row["id"], slices=slices, id=row["id"], source=row.get("source"))
    return _from_shard(row, data_dirs)


def _from_shard(row: dict[str, Any], data_dirs: list[str]) -> Sample:
    from unimm.data.shards import decode_sample

    for folder in data_dirs:
        base = Path(folder)
        shard = base if base.name == row["shard"] else base / row["shard"]
        if not shard.is_file():
            continue
        raw: dict[str, Any] = {"__key__": row["key"], "__url__": str(shard)}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name.startswith(row["key"] + "."):
                    raw[name[len(row["key"]) + 1 :]] = tar.extractfile(member).read()
        if "json" in raw:
            return decode_sample(raw)
    raise UnimmError(f"document {row['id']}: its shard {row['shard']} is not in {', '.join(data_dirs)}")
