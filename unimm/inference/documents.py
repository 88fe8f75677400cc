"""The documents of an index: read from prepared shards or straight from record files, each with
the index row that finds it again (for chat's retrieval-augmented answers and the server).

A row of a shard document names its shard and key (the document is read back from the shard);
a row of a record document carries the record itself, its image paths resolved and confined as
``unimm prepare`` does, so the record file need not be read again.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from unimm.data.samples import Sample, Slice
from unimm.errors import UnimmError


def is_shards(source: str | Path) -> bool:
    """Whether ``source`` is prepared shards (a directory or a ``.tar`` file) rather than records
    (files, or a datasets folder or imagefolder)."""
    from unimm.data.tables import is_table

    path = Path(source)
    return (path.is_dir() and not is_table(path)) or path.suffix == ".tar"


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
        elif not (Path(source).is_file() or Path(source).is_dir()):
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
        columns: an image–text table's columns (:func:`unimm.data.tables.parse_columns`).
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
        columns: dict[str, str] | None = None,
    ) -> None:
        from unimm.data.shards import ReadStats

        self.sources, self.fmt, self.image_root, self.columns = sources, fmt, image_root, columns
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
                    view = {k: v for k, v in _view_of(s).items() if k != "source"}
                    yield (
                        s,
                        {
                            "id": s.id,
                            "shard": Path(s.url).name,
                            "key": s.key,
                            "source": s.source,
                            "view": view,
                        },
                    )
                continue
            on_error = self.reject if self.on_error == "skip" else None
            records = iter_decoded_records(
                source, self.fmt, self.image_root, on_error=on_error, columns=self.columns
            )
            for record, sample in records:
                _refuse_pair(sample)
                slices = [_row_slice(s) for s in record.slices]
                row = {"id": record.id, "source": sample.source, "slices": slices}
                yield sample, row | ({"meta": record.meta} if record.meta else {})


def _row_slice(item) -> dict[str, Any]:
    """A record slice as an index row keeps it (an image held in a table: its locator)."""
    from unimm.data.tables import is_embedded

    if is_embedded(item.value):
        return {"kind": item.kind, "embedded": item.value.as_json(), "role": item.role}
    return {"kind": item.kind, "value": item.value, "role": item.role}


def _row_image(entry: dict[str, Any]):
    """An index row's image slice opened: its file, or its table cell."""
    from unimm.data.adapters import open_image
    from unimm.data.tables import EmbeddedImage

    return open_image(EmbeddedImage.from_json(entry["embedded"]) if "embedded" in entry else entry["value"])


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
    if "slices" in row:
        slices = [
            Slice.of_text(s["value"], s["role"])
            if s["kind"] == "text"
            else Slice.of_image(_row_image(s), s["role"])
            for s in row["slices"]
        ]
        return Sample(key=row["id"], slices=slices, id=row["id"], source=row.get("source"))
    return _from_shard(row, data_dirs)


_FILE_LINE = re.compile(r"^(.*):(\d+)$")


def document_view(row: dict[str, Any], data_dirs: list[str], sample: Sample | None = None) -> dict[str, Any]:
    """What a search result says about the document behind ``row``, in one shape whatever the
    index was built from: ``text`` (its text slices, one per line), ``images`` (how many),
    ``metadata`` (the record's ``meta``) and ``source`` (``{"file", "line"}``: the record file's
    name and line, or the prepared record's). Read from the row itself (a record row keeps its
    slices, a shard row its view); only a shard row of an older index reads its shard, unless
    ``sample`` (already loaded) is given. A row with nothing but its id has an empty view.

    Raises:
        UnimmError: the shard of an older index is no longer where it was.
    """
    if "view" in row:
        view = row["view"]
        return {**view, "metadata": view.get("metadata") or {}, "source": _source_of(row.get("source"))}
    if sample is None and "slices" not in row:
        if "shard" not in row:  # a row known by its id alone (e.g. `unimm bench index`'s vectors)
            return {"text": "", "images": 0, "metadata": {}, "source": _source_of(row.get("source"))}
        sample = _from_shard(row, data_dirs)
    if sample is not None:
        return _view_of(sample, row.get("meta"))
    kinds_and_values = [(s["kind"], s.get("value")) for s in row["slices"]]
    return {
        "text": "\n".join(value for kind, value in kinds_and_values if kind == "text"),
        "images": sum(kind == "image" for kind, _ in kinds_and_values),
        "metadata": row.get("meta") or {},
        "source": _source_of(row.get("source")),
    }


def _view_of(sample: Sample, meta: dict | None = None) -> dict[str, Any]:
    return {
        "text": "\n".join(s.text for s in sample.slices if s.kind == "text"),
        "images": sum(s.kind == "image" for s in sample.slices),
        "metadata": sample.meta or meta or {},
        "source": _source_of(sample.source),
    }


def _source_of(source: Any) -> dict[str, Any]:
    """``{"file", "line"}`` of a prepared record's header or a record's ``path:line``."""
    line = None
    if isinstance(source, dict):
        source, line = source.get("file"), source.get("line")
    elif isinstance(source, str) and (at := _FILE_LINE.match(source)):
        source, line = at.group(1), int(at.group(2))
    return {"file": Path(source).name if source else None, "line": line}


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
