"""Image–text tables: Parquet files, Hugging Face ``datasets`` folders and ``imagefolder``
layouts, and the column mapping (``--columns``) that also applies to CSV/TSV.

Each row becomes the record ``[image, text]`` (an image–caption pair, as the CSV input):

- **Parquet** (``*.parquet``): read a row group at a time (a pair table, MMEB's or
  query/positive columns, stays a pair input: :mod:`unimm.data.pairs`).
- **datasets folder** (what ``Dataset.save_to_disk`` writes: ``state.json``,
  ``dataset_info.json``, ``data-*.arrow``): the Arrow files are memory-mapped and read a batch at a
  time, so a dataset larger than memory streams. A ``DatasetDict`` folder is refused, naming its
  splits (give the split's folder).
- **imagefolder** (a folder with ``metadata.jsonl`` or ``metadata.csv`` whose ``file_name``
  column names each image, relative to the folder, beside its other columns).

Columns: ``image`` (default: the first of ``image``, ``file_name``, ``image_path``), ``text``
(``caption``, ``text``, ``sentence``), ``id`` (``id``, ``key``, ``image_id``; default
``STEM-ROW``). ``--columns image=path,text=caption,id=key`` names others. An image is a path (relative
to ``--image-root``, default the table's folder), encoded bytes, or a ``datasets`` ``Image``
feature (``{"bytes", "path"}``); a text that is a list of strings (several captions) gives one record
per caption (ids ``ID-1``, ``ID-2``…). Images held in the table are not copied out: a record
keeps an :class:`EmbeddedImage` (file, row, column, and the file's size and time) and the bytes
are read back when the image is encoded or opened (:func:`read_embedded`), so a dataset is
never loaded whole. Reading one back decodes its row group's image column (Parquet; cached, so
reading in table order reads each group once) or touches the memory-mapped Arrow file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unimm.data.records import Record, RecordSlice
from unimm.errors import DataError, UnimmError

COLUMN_ROLES = ("image", "text", "id")
DEFAULT_COLUMNS = {
    "image": ("image", "file_name", "image_path"),
    "text": ("caption", "text", "sentence"),
    "id": ("id", "key", "image_id"),
}
_BATCH_ROWS = 256
_METADATA = ("metadata.jsonl", "metadata.csv")


def parse_columns(spec: str | dict[str, str] | None) -> dict[str, str]:
    """``image=path,text=caption,id=key`` (or the mapping itself) as ``{role: column}``.

    Raises:
        UnimmError: an unknown role, a missing ``=`` or an empty column name.
    """
    if not spec:
        return {}
    items = spec.items() if isinstance(spec, dict) else (part.partition("=")[::2] for part in spec.split(","))
    out = {}
    for role, column in items:
        role, column = role.strip().lower(), str(column).strip()
        if role not in COLUMN_ROLES or not column:
            raise UnimmError(
                f"--columns {spec}: give ROLE=COLUMN pairs with roles {', '.join(COLUMN_ROLES)} "
                "(e.g. --columns image=path,text=caption,id=key)"
            )
        out[role] = column
    return out


def is_table(path: Path) -> bool:
    """Whether ``path`` is a table input of this module (a datasets or imagefolder folder)."""
    return path.is_dir() and (
        _is_datasets(path) or _metadata_file(path) is not None or _is_dataset_dict(path)
    )


def _is_datasets(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _is_dataset_dict(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file()


def _metadata_file(path: Path) -> Path | None:
    return next((path / name for name in _METADATA if (path / name).is_file()), None)


def input_files(path: Path) -> list[Path]:
    """The files whose bytes make up a table input (hashed into prepare's fingerprint)."""
    if not path.is_dir():
        return [path]
    if _is_datasets(path):
        return [path / "state.json", *_arrow_files(path)]
    metadata = _metadata_file(path)
    return [metadata] if metadata is not None else []


def input_hash(path: Path) -> str:
    """sha256 of an input: a file's bytes, or a folder's table files (their names and hashes)."""
    import hashlib

    from unimm.utils import sha256_file

    if path.is_file():
        return sha256_file(path)
    try:
        lines = "".join(f"{f.name}:{sha256_file(f)}\n" for f in input_files(path))
    except DataError as exc:
        raise UnimmError(str(exc)) from None
    except OSError as exc:
        raise UnimmError(f"{path}: cannot read its files ({exc.strerror or exc})") from None
    return hashlib.sha256(lines.encode()).hexdigest()


def default_image_root(path: Path) -> Path:
    """Where an input's relative image paths start: a table folder itself, a file's folder."""
    return path if path.is_dir() else path.parent


def _arrow_files(folder: Path) -> list[Path]:
    """The Arrow files ``state.json`` lists, each a plain file name inside the folder.

    Raises:
        DataError: ``state.json`` is not a datasets folder's, or names a file elsewhere.
    """
    source = str(folder / "state.json")
    try:
        entries = json.loads((folder / "state.json").read_text(encoding="utf-8"))["_data_files"]
        names = [str(entry["filename"]) for entry in entries]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"not a datasets folder's state.json ({type(exc).__name__}: {exc})", source=source
        ) from None
    for name in names:
        if Path(name).name != name or name in ("", ".", ".."):
            raise DataError(
                f"names the data file {name!r}; it must be a file of the folder itself", source=source
            )
    return [folder / name for name in names]


def choose_columns(
    names: list[str], given: dict[str, str], source: str, defaults: dict[str, tuple[str, ...]] | None = None
) -> dict[str, str]:
    """The table's column for each role: the given mapping, else the first of ``defaults``
    (default: :data:`DEFAULT_COLUMNS`) present.

    Raises:
        DataError: a mapped column the table lacks, or no image or text column (naming the
            table's columns and ``--columns``).
    """
    present = set(names)
    chosen: dict[str, str] = {}
    for role in COLUMN_ROLES:
        if role in given:
            if given[role] not in present:
                raise DataError(
                    f"--columns {role}={given[role]}: no such column (found: {', '.join(names)})",
                    source=source,
                )
            chosen[role] = given[role]
        else:
            found = next((c for c in (defaults or DEFAULT_COLUMNS)[role] if c in present), None)
            if found is not None:
                chosen[role] = found
    missing = [role for role in ("image", "text") if role not in chosen]
    if missing:
        raise DataError(
            f"no {' or '.join(missing)} column (found: {', '.join(names) or 'none'}); name yours with "
            "--columns image=COLUMN,text=COLUMN",
            source=source,
        )
    return chosen


@dataclasses.dataclass(frozen=True)
class EmbeddedImage:
    """An image held in row ``row`` (0-based, of that file) of ``file``'s ``column``: what a
    record's image value is when the table holds the bytes. Only the table readers make one (a
    record file's string can never become one), and it remembers the file's size and
    modification time, so a table rewritten since it was read is reported, not misread."""

    file: str
    row: int
    column: str
    size: int
    mtime_ns: int

    def __str__(self) -> str:  # what shards and messages show as the image's "path"
        return f"{self.file}[row {self.row + 1}, column {self.column!r}]"

    def as_json(self) -> dict[str, Any]:
        """The locator as an index row keeps it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> EmbeddedImage:
        """A locator read back from an index row.

        Raises:
            UnimmError: the row's locator is not one.
        """
        try:
            return cls(
                str(obj["file"]), int(obj["row"]), str(obj["column"]), int(obj["size"]), int(obj["mtime_ns"])
            )
        except (KeyError, TypeError, ValueError):
            raise UnimmError(
                f"an index row's embedded image is malformed ({obj!r}); embed the table again"
            ) from None


def _identity(file: Path) -> tuple[str, int, int]:
    """What an :class:`EmbeddedImage` of ``file`` remembers of it: its path, size and time."""
    stat = file.stat()
    return str(file.resolve()), stat.st_size, stat.st_mtime_ns


def is_embedded(value: Any) -> bool:
    """Whether an image value is held in a table (an :class:`EmbeddedImage`) rather than a path."""
    return isinstance(value, EmbeddedImage)


def read_embedded(image: EmbeddedImage) -> bytes:
    """The encoded image ``image`` points at.

    Raises:
        UnimmError: the table changed since it was read, or the cell holds no image.
    """
    import os

    try:
        stat = os.stat(image.file)
    except OSError as exc:
        raise UnimmError(f"image {image}: cannot read the table ({exc.strerror or exc})") from None
    if (stat.st_size, stat.st_mtime_ns) != (image.size, image.mtime_ns):
        raise UnimmError(f"image {image}: the table changed since it was read; run again")
    try:
        cell = _cell(image.file, image.row, image.column)
    except Exception as exc:  # pyarrow's own errors, a missing column or row of a damaged file
        raise UnimmError(
            f"image {image}: cannot read it from the table ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    if not isinstance(cell, (bytes, bytearray)) or not cell:
        raise UnimmError(f"image {image}: no image bytes there")
    return bytes(cell)


def _cell(file: str, row: int, column: str) -> Any:
    if file.endswith(".arrow"):
        table = _arrow_table(file)
        return table.column(column)[row].as_py()
    group, offset = _row_group_of(file, row)
    return _parquet_group(file, group, column).column(0)[offset].as_py()


@functools.lru_cache(maxsize=4)
def _arrow_table(file: str):
    """A datasets Arrow file, memory-mapped (its buffers are read only when touched)."""
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(file)).read_all()


@functools.lru_cache(maxsize=16)
def _row_starts(file: str) -> list[int]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(file).metadata
    starts, at = [], 0
    for group in range(meta.num_row_groups):
        starts.append(at)
        at += meta.row_group(group).num_rows
    return [*starts, at]


def _row_group_of(file: str, row: int) -> tuple[int, int]:
    import bisect

    starts = _row_starts(file)
    group = bisect.bisect_right(starts, row) - 1
    if not 0 <= group < len(starts) - 1:
        raise UnimmError(f"{file}: no row {row + 1} (did the file change?)")
    return group, row - starts[group]


@functools.lru_cache(maxsize=2)  # images are read in table order: one row group at a time
def _parquet_group(file: str, group: int, column: str):
    import pyarrow.parquet as pq

    return pq.ParquetFile(file).read_row_group(group, columns=[column])


def _pyarrow(source: str):
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError(
            'reading Parquet and datasets folders needs pyarrow: pip install "unimm[benchmarks]"',
            source=source,
        ) from None
    return pa


def iter_table(path: Path, columns: dict[str, str]) -> Iterator[Record | DataError]:
    """The records of a Parquet file, a datasets folder or an imagefolder (module docs)."""
    source = str(path)
    try:
        if path.is_dir() and _is_dataset_dict(path):
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
            raise DataError(
                f"a DatasetDict folder (splits: {', '.join(splits)}); give one split's folder, "
                f"e.g. {path / (splits or ['train'])[0]}",
                source=source,
            )
        if path.is_dir() and _is_datasets(path):
            yield from _rows(path, _arrow_batches(path), columns)
        elif path.is_dir():
            yield from _imagefolder(path, columns)
        else:
            yield from _rows(path, _parquet_batches(path), columns)
    except DataError as exc:
        yield exc


def _parquet_batches(path: Path) -> Iterator[tuple[Path, list[str], Any]]:
    _pyarrow(str(path))
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow's ArrowInvalid for a file that is not Parquet
        raise DataError(f"not a Parquet file ({exc})", source=str(path)) from None
    names = table.schema_arrow.names
    for batch in table.iter_batches(batch_size=_BATCH_ROWS):
        yield path, names, batch


def _arrow_batches(folder: Path) -> Iterator[tuple[Path, list[str], Any]]:
    pa = _pyarrow(str(folder))
    try:
        files = _arrow_files(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"state.json cannot be read as a datasets folder's ({exc})", source=str(folder)
        ) from None
    for file in files:
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(file)))
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"{file.name}: not a datasets Arrow file ({exc})", source=str(folder)) from None
        for batch in reader:
            yield file, reader.schema.names, batch


def _rows(
    path: Path, batches: Iterator[tuple[Path, list[str], Any]], given: dict[str, str]
) -> Iterator[Record | DataError]:
    """Records from ``(file, column names, record batch)``; a row's line is its number in the
    input (1 = the first), and its embedded image points at its row in ``file``."""
    source, chosen, number, current, in_file = str(path), None, 0, None, 0
    for file, names, batch in batches:
        if chosen is None:
            chosen = choose_columns(names, given, source)
        if file != current:
            current, in_file, (name, size, mtime) = file, 0, _identity(file)
        column = chosen["image"]
        wanted = list(dict.fromkeys(chosen.values()))
        for row in batch.select(wanted).to_pylist():
            number += 1
            image = _image_value(row[column], lambda: EmbeddedImage(name, in_file, column, size, mtime))  # noqa: B023
            in_file += 1
            yield from _caption_records(row, chosen, image, source, number, f"{path.stem}-{number}")


def _image_value(cell: Any, locate) -> str | EmbeddedImage | None:
    """A path, or (``locate()``) the locator of the bytes the cell holds; ``None`` when it holds
    neither."""
    if isinstance(cell, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
        if cell.get("bytes"):
            return locate()
        cell = cell.get("path")
    if isinstance(cell, (bytes, bytearray)):
        return locate() if cell else None
    return _path_cell(cell)


def _caption_records(
    row: dict[str, Any],
    chosen: dict[str, str],
    image: str | EmbeddedImage | None,
    source: str,
    line: int,
    default_id: str,
) -> Iterator[Record | DataError]:
    raw_id = row.get(chosen["id"]) if "id" in chosen else None
    rid = str(raw_id).strip() if raw_id is not None and str(raw_id).strip() else default_id
    text = row.get(chosen["text"])
    if image is None:
        yield DataError(f"empty image (column {chosen['image']!r})", source=source, line=line, record_id=rid)
        return
    texts = text if isinstance(text, list) else [text]
    texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        yield DataError(f"empty text (column {chosen['text']!r})", source=source, line=line, record_id=rid)
        return
    for n, caption in enumerate(texts, 1):
        yield Record(
            id=rid if len(texts) == 1 else f"{rid}-{n}",
            slices=[RecordSlice("image", image), RecordSlice("text", caption)],
            source=source,
            line=line,
        )


def _path_cell(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


_IMAGEFOLDER_COLUMNS = {**DEFAULT_COLUMNS, "image": ("file_name",)}


def _imagefolder(folder: Path, given: dict[str, str]) -> Iterator[Record | DataError]:
    """An imagefolder: ``file_name`` (or the mapped image column) of each metadata row names an
    image relative to the folder."""
    metadata = _metadata_file(folder)
    try:
        rows = _metadata_rows(metadata)
        chosen = None
        for line, row in rows:
            if isinstance(row, DataError):
                yield row
                continue
            if chosen is None:
                chosen = choose_columns(list(row), given, str(metadata), _IMAGEFOLDER_COLUMNS)
            image = _path_cell(row.get(chosen["image"]))
            yield from _caption_records(row, chosen, image, str(metadata), line, f"{folder.name}-{line}")
    except (OSError, UnicodeDecodeError) as exc:
        yield DataError(f"cannot read it as UTF-8 text ({exc})", source=str(metadata))


def _metadata_rows(metadata: Path) -> Iterator[tuple[int, dict[str, Any] | DataError]]:
    """``(line, row)`` of an imagefolder's metadata file (a bad line: its error)."""
    import csv

    source = str(metadata)
    with metadata.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a spreadsheet's BOM
        if metadata.suffix == ".csv":
            reader = csv.DictReader(handle)
            try:
                for row in reader:
                    yield reader.line_num, row
            except csv.Error as exc:
                yield (
                    reader.line_num,
                    DataError(f"not a valid CSV row ({exc})", source=source, line=reader.line_num),
                )
            return
        for line, text in enumerate(handle, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                yield line, DataError(f"not valid JSON ({exc.msg})", source=source, line=line)
                continue
            if not isinstance(row, dict):
                yield line, DataError("a metadata line must be a JSON object", source=source, line=line)
                continue
            yield line, row
