"""Input adapters: unimm JSONL (records and pair records), LLaVA conversations, MMC4 documents,
image–caption CSV/TSV, and pair tables (MMEB's training layout, query/positive/negative columns)
as JSON Lines, CSV/TSV or Parquet (:mod:`unimm.data.pairs`).

:func:`iter_records` reads one file and yields a :class:`~unimm.data.records.Record` per good
record and a :class:`~unimm.errors.DataError` (not raised) per bad one, each located by file and
line, so that ``--on-error skip`` can go on and ``fail`` can stop with a precise message.

Mapping of each format to slices (documented in docs/formats.md):

- LLaVA: human turns are split at ``<image>`` placeholders, the n-th placeholder taking the n-th
  image; a sample with images but no placeholder gets them before its first question (LLaVA's
  convention). The last ``gpt`` turn is the response; earlier ``gpt`` turns become context
  slices with ``role: assistant``.
- MMC4: each image is placed before the sentence it is matched to (``matched_text_index``),
  images matched to the same sentence in ``image_info`` order; empty sentences are dropped.
- CSV/TSV: a header with ``image`` and ``caption`` columns (``id`` optional) -> [image, text];
  a header with ``query`` and ``positive`` (or MMEB's ``qry``, ``pos_text``, ...) -> pair records.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from unimm.data.records import Record, RecordLimits, RecordSlice, record_from_obj
from unimm.data.samples import Sample, Slice
from unimm.errors import DataError, UnimmError

FORMATS = ("unimm", "llava", "mmc4", "csv", "mmeb", "parquet")
_IMAGE_TOKEN = "<image>"
_HUMAN = {"human": "user", "user": "user"}
_GPT = {"gpt": "assistant", "assistant": "assistant"}


def iter_records(
    path: str | Path,
    fmt: str = "auto",
    limits: RecordLimits | None = None,
    *,
    columns: dict[str, str] | None = None,
) -> Iterator[Record | DataError]:
    """Yield the records of one input file (or a located :class:`DataError` for each bad one).

    No line can crash the reader: JSON nesting, number sizes, field sizes and slice counts are
    bounded by ``limits`` and text must be valid Unicode (a lone surrogate escape such as
    ``\\ud800`` is refused here, not when a shard is written).

    Args:
        path: the input file.
        fmt: ``auto`` or one of :data:`FORMATS` (a folder is a table input whatever it says).
        limits: what one record may hold (default: :class:`RecordLimits`).
        columns: ``{role: column}`` for image–text tables (CSV/TSV, Parquet, datasets folders,
            imagefolders; :func:`unimm.data.tables.parse_columns`).
    """
    limits = limits or RecordLimits()
    path = Path(path)
    source = str(path)
    columns = columns or {}
    tables = _streamed_table(path, fmt, columns)
    if tables is not None:  # read a batch at a time, never whole
        yield from _bounded(tables, limits)
        return
    try:
        data = path.read_bytes()
    except OSError as exc:
        yield DataError(f"cannot read input file: {exc.strerror or exc}", source=source)
        return
    if not data.strip():
        yield DataError("input file is empty: nothing to prepare", source=source)
        return
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if fmt == "csv" or (fmt == "auto" and path.suffix.lower() in (".csv", ".tsv")):
        yield from _bounded(_iter_csv(data, path, limits, columns), limits)
        return
    objects = _iter_json_objects(data, source, limits)
    if fmt == "auto":
        # The first decodable record decides; bad lines before it are reported, not guessed at.
        for item in objects:
            if isinstance(item, DataError):
                yield item
                continue
            try:
                fmt = detect_format(item[0], source)
            except DataError as exc:
                yield exc
                return
            objects = _chain([item], objects)
            break
        if fmt == "auto":
            return
    convert = {"unimm": _unimm, "llava": _llava, "mmc4": _mmc4, "mmeb": _mmeb}.get(fmt)
    if convert is None:
        raise DataError(f"unknown format {fmt!r}; use one of auto, {', '.join(FORMATS)}", source=source)
    stem = path.stem

    def converted() -> Iterator[Record | DataError]:
        for item in objects:
            if isinstance(item, DataError):
                yield item
                continue
            obj, line = item
            try:
                yield convert(obj, source, line, f"{stem}-{line}")
            except DataError as exc:
                yield exc

    yield from _bounded(converted(), limits)


def _streamed_table(path: Path, fmt: str, columns: dict[str, str]) -> Iterator[Record | DataError] | None:
    """The records of a folder or Parquet input (:mod:`unimm.data.tables`), ``None`` for a file
    read whole."""
    from unimm.data.tables import is_table, iter_table

    if path.is_dir():
        if is_table(path):
            return iter_table(path, columns)
        error = DataError(
            "a folder input must be a datasets folder (save_to_disk: state.json, data-*.arrow) or an "
            "imagefolder (images beside a metadata.jsonl or metadata.csv naming each file_name)",
            source=str(path),
        )
        return iter([error])
    if fmt == "parquet" or (fmt == "auto" and path.suffix.lower() == ".parquet"):
        from unimm.data.pairs import iter_parquet

        return iter_table(path, columns) if columns else iter_parquet(path)
    return None


def _bounded(items: Iterator[Record | DataError], limits: RecordLimits) -> Iterator[Record | DataError]:
    """``items`` with a record over the slice limit turned into its error."""
    for item in items:
        if isinstance(item, Record) and len(item.slices) > limits.slices:
            item = DataError(
                f"{len(item.slices)} slices (limit {limits.slices}; prepare.max_slices)",
                source=item.source,
                line=item.line,
                record_id=item.id,
            )
        yield item


def _decoder(limits: RecordLimits) -> json.JSONDecoder:
    """A JSON decoder that refuses oversized numbers and non-JSON constants (NaN, Infinity) with a
    :class:`ValueError` saying which."""

    def number(kind):
        def parse(digits: str):
            if len(digits) > limits.number_digits:
                limit = f"limit {limits.number_digits}; prepare.max_number_digits"
                raise ValueError(f"a number with {len(digits)} digits ({limit})")
            return kind(digits)

        return parse

    def constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    return json.JSONDecoder(parse_int=number(int), parse_float=number(float), parse_constant=constant)


def _decode_json(text: str, limits: RecordLimits) -> Any:
    """One JSON value within ``limits`` (see :func:`_decoder` and :func:`_check_tree`)."""
    try:
        obj = _decoder(limits).decode(text)
    except RecursionError:
        raise ValueError(f"nested too deeply (limit {limits.depth}; prepare.max_record_depth)") from None
    _check_tree(obj, limits)
    return obj


def _check_tree(obj: Any, limits: RecordLimits) -> None:
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > limits.depth:
                raise ValueError(f"nested deeper than {limits.depth} levels (prepare.max_record_depth)")
            items = [*node.keys(), *node.values()] if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in items)
        elif isinstance(node, str):
            if len(node) > limits.text_chars:
                raise ValueError(
                    f"a string of {len(node)} characters (limit {limits.text_chars}; prepare.max_text_chars)"
                )
            try:
                node.encode("utf-8")
            except UnicodeEncodeError as exc:
                bad = node[exc.start]
                raise ValueError(
                    f"text holds a lone surrogate (\\u{ord(bad):04x}), not valid Unicode"
                ) from None


def detect_format(obj: Any, source: str) -> str:
    """Name the format of a decoded first record from its keys."""
    if isinstance(obj, dict):
        if "slices" in obj or "query" in obj or "positive" in obj:
            return "unimm"
        if "qry" in obj:
            return "mmeb"
        if "conversations" in obj:
            return "llava"
        if "text_list" in obj:
            return "mmc4"
        keys = ", ".join(sorted(map(str, obj)))
    else:
        keys = type(obj).__name__
    raise DataError(
        f"cannot tell the format from the first record (keys: {keys}); expected 'slices' (unimm), "
        "'query' (a unimm pair record), 'qry' (MMEB's training layout), 'conversations' (llava) or "
        "'text_list' (mmc4), or pass --format",
        source=source,
    )


def _chain(head: list, tail: Iterator) -> Iterator:
    yield from head
    yield from tail


def _iter_json_objects(
    data: bytes, source: str, limits: RecordLimits
) -> Iterator[tuple[Any, int] | DataError]:
    """Yield ``(object, line)`` from JSONL, or from a JSON array (each item located by line)."""
    if data.lstrip()[:1] == b"[":
        yield from _iter_json_array(data, source, limits)
        return
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield DataError(f"not UTF-8 text (byte {exc.start})", source=source, line=number)
            continue
        try:
            obj = _decode_json(text, limits)
        except json.JSONDecodeError as exc:
            yield DataError(f"not valid JSON: {exc.msg} (column {exc.colno})", source=source, line=number)
        except ValueError as exc:
            yield DataError(str(exc), source=source, line=number)
        else:
            yield obj, number


def _iter_json_array(data: bytes, source: str, limits: RecordLimits) -> Iterator[tuple[Any, int] | DataError]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        yield DataError(f"not UTF-8 text (byte {exc.start})", source=source)
        return
    decoder = _decoder(limits)
    ws = re.compile(r"\s*")
    pos = ws.match(text, 0).end() + 1  # after '['
    pos = ws.match(text, pos).end()
    if text[pos : pos + 1] == "]":
        return
    while True:
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            yield DataError(f"not valid JSON: {exc.msg}", source=source, line=exc.lineno)
            return  # the array's structure is lost: nothing after this point can be located
        except (ValueError, RecursionError) as exc:  # a limit, inside an item: its end is unknown
            reason = str(exc) if isinstance(exc, ValueError) else f"nested too deeply (limit {limits.depth})"
            yield DataError(f"{reason}; the rest of the array cannot be located", source=source, line=line)
            return
        try:
            _check_tree(obj, limits)
        except ValueError as exc:
            yield DataError(str(exc), source=source, line=line)
        else:
            yield obj, line
        pos = ws.match(text, pos).end()
        sep = text[pos : pos + 1]
        if sep == "]":
            return
        if sep != ",":
            yield DataError(
                "not valid JSON: expected ',' or ']' between array items",
                source=source,
                line=text.count("\n", 0, pos) + 1,
            )
            return
        pos = ws.match(text, pos + 1).end()


def _unimm(obj: Any, source: str, line: int, default_id: str) -> Record:
    return record_from_obj(obj, source=source, line=line)


def _mmeb(obj: Any, source: str, line: int, default_id: str) -> Record:
    from unimm.data.pairs import mmeb_record

    if not isinstance(obj, dict):
        raise DataError(
            f"an MMEB row must be a JSON object, got {type(obj).__name__}", source=source, line=line
        )
    return mmeb_record(obj, source, line, default_id)


def _record_id(obj: dict, keys: tuple[str, ...], default_id: str) -> str:
    for key in keys:
        value = obj.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            return str(value)
    return default_id


def _llava(obj: Any, source: str, line: int, default_id: str) -> Record:
    if not isinstance(obj, dict):
        raise DataError(
            f"a LLaVA sample must be a JSON object, got {type(obj).__name__}", source=source, line=line
        )
    rid = _record_id(obj, ("id",), default_id)

    def fail(reason: str) -> DataError:
        return DataError(reason, source=source, line=line, record_id=rid)

    images = obj.get("image", [])
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(i, str) and i.strip() for i in images):
        raise fail("'image' must be a path or a list of paths")
    turns = obj.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise fail('\'conversations\' must be a non-empty list of {"from": ..., "value": ...} turns')
    parsed: list[tuple[str, str]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise fail(f"turn {i} must be an object")
        speaker, value = turn.get("from"), turn.get("value")
        if not isinstance(speaker, str) or (speaker not in _HUMAN and speaker not in _GPT):
            raise fail(f"turn {i}: 'from' must be human or gpt, got {speaker!r}")
        if not isinstance(value, str):
            raise fail(f"turn {i}: 'value' must be a string, got {type(value).__name__}")
        parsed.append((_HUMAN.get(speaker) or _GPT[speaker], value))
    placeholders = sum(v.count(_IMAGE_TOKEN) for role, v in parsed if role == "user")
    if placeholders and placeholders != len(images):
        raise fail(f"{placeholders} '<image>' placeholder(s) but {len(images)} image(s)")
    response = None
    if parsed[-1][0] == "assistant":
        response = parsed.pop()[1].strip() or None
    slices: list[RecordSlice] = []
    next_image = 0
    if not placeholders:
        slices.extend(RecordSlice("image", path) for path in images)
        next_image = len(images)
    for role, value in parsed:
        pieces = value.split(_IMAGE_TOKEN) if role == "user" else [value]
        for j, piece in enumerate(pieces):
            if j > 0:
                slices.append(RecordSlice("image", images[next_image]))
                next_image += 1
            if piece.strip():
                slices.append(RecordSlice("text", piece.strip(), role))
    if not slices:
        raise fail("the conversation has no question text or image before the answer")
    return Record(id=rid, slices=slices, response=response, source=source, line=line)


def _mmc4(obj: Any, source: str, line: int, default_id: str) -> Record:
    if not isinstance(obj, dict):
        raise DataError(
            f"an MMC4 document must be a JSON object, got {type(obj).__name__}", source=source, line=line
        )
    rid = _record_id(obj, ("id", "doc_id"), default_id)

    def fail(reason: str) -> DataError:
        return DataError(reason, source=source, line=line, record_id=rid)

    texts = obj.get("text_list")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise fail("'text_list' must be a list of strings")
    infos = obj.get("image_info", [])
    if not isinstance(infos, list):
        raise fail("'image_info' must be a list")
    before: dict[int, list[str]] = {}
    for k, info in enumerate(infos):
        if not isinstance(info, dict):
            raise fail(f"image_info[{k}] must be an object")
        name, index = info.get("image_name"), info.get("matched_text_index")
        if not isinstance(name, str) or not name.strip():
            raise fail(f"image_info[{k}].image_name must be a non-empty string")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(texts):
            raise fail(
                f"image_info[{k}].matched_text_index must be an index into text_list (0..{len(texts) - 1})"
            )
        before.setdefault(index, []).append(name)
    slices: list[RecordSlice] = []
    for i, text in enumerate(texts):
        slices.extend(RecordSlice("image", name) for name in before.get(i, []))
        if text.strip():
            slices.append(RecordSlice("text", text.strip()))
    if not slices:
        raise fail("the document has no text and no image")
    meta = {"url": obj["url"]} if isinstance(obj.get("url"), str) else None
    return Record(id=rid, slices=slices, meta=meta, source=source, line=line)


def _iter_csv(
    data: bytes, path: Path, limits: RecordLimits, columns: dict[str, str]
) -> Iterator[Record | DataError]:
    source = str(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        yield DataError(f"not UTF-8 text (byte {exc.start})", source=source)
        return
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    from unimm.data.pairs import mmeb_record, table_columns, table_record

    if columns:
        try:
            header = _mapped_header(header, [h.strip() for h in reader.fieldnames or []], columns)
        except DataError as exc:
            yield DataError(exc.reason, source=source, line=1)
            return

    layout = table_columns(header)
    convert = {"mmeb": mmeb_record, "pairs": table_record}.get(layout or "", _caption_row)
    if layout is None and ("image" not in header or "caption" not in header):
        yield DataError(
            "the header must name 'image' and 'caption' columns, or 'query' and 'positive' (pairs), "
            f"or MMEB's 'qry', 'pos_text', ... (found: {', '.join(header) or 'none'})",
            source=source,
            line=1,
        )
        return
    reader.fieldnames = header
    start = 2
    limit = csv.field_size_limit(limits.text_chars)  # process-wide: restored below
    try:
        yield from _csv_rows(reader, path, start, convert)
    finally:
        csv.field_size_limit(limit)


def _mapped_header(header: list[str], written: list[str], columns: dict[str, str]) -> list[str]:
    """The header with each ``--columns`` column renamed to its role (``text`` is the caption);
    a column already named like a role it was not mapped to steps aside, so the mapped one is
    read."""
    renames = {}
    for role, column in columns.items():
        if column not in written and column.lower() not in header:
            raise DataError(
                f"--columns {role}={column}: no such column (found: {', '.join(written)})", line=1
            )
        renames[column.lower()] = "caption" if role == "text" else role
    taken = set(renames.values())
    return [renames.get(name, f"{name} (not mapped)" if name in taken else name) for name in header]


def _csv_rows(reader: csv.DictReader, path: Path, start: int, convert) -> Iterator[Record | DataError]:
    source = str(path)
    while True:
        line = start
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # a field over the limit, a NUL byte, ...: this row only
            start = max(reader.line_num, line) + 1  # the reader does not count the line it refused
            yield DataError(f"not a valid CSV row ({exc}; prepare.max_text_chars)", source=source, line=line)
            continue
        start = reader.line_num + 1
        default_id = f"{path.stem}-{line}"
        if None in row:
            rid = (row.get("id") or "").strip() or default_id
            yield DataError("more fields than header columns", source=source, line=line, record_id=rid)
            continue
        try:
            yield convert(row, source, line, default_id)
        except DataError as exc:
            yield exc


def _caption_row(row: dict[str, str], source: str, line: int, default_id: str) -> Record:
    rid = (row.get("id") or "").strip() or default_id
    image, caption = (row.get("image") or "").strip(), (row.get("caption") or "").strip()
    if not image:
        raise DataError("empty 'image' field", source=source, line=line, record_id=rid)
    if not caption:
        raise DataError("empty 'caption' field", source=source, line=line, record_id=rid)
    return Record(
        id=rid, slices=[RecordSlice("image", image), RecordSlice("text", caption)], source=source, line=line
    )


def open_image(path, root: str | Path | None = None):
    """An RGB PIL image from ``path`` (confined to ``root`` when given, as records are).

    Raises:
        UnimmError: naming the path and why it cannot be read.
    """
    from PIL import Image, ImageOps

    from unimm.data.images import ImageProblem, read_image_source, resolve_image_source, to_rgb
    from unimm.data.tables import is_embedded

    try:
        file = (
            resolve_image_source(path if is_embedded(path) else str(path), root) if root is not None else path
        )
        with Image.open(io.BytesIO(read_image_source(file))) as img:
            return to_rgb(ImageOps.exif_transpose(img))
    except ImageProblem as exc:
        raise UnimmError(str(exc)) from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UnimmError(f"image {path}: cannot read it ({exc})") from None


def load_decoded_records(
    path: str | Path, fmt: str = "auto", image_root: str | Path | None = None
) -> list[Sample]:
    """Read a record file into decoded samples, as shard readers give them (images opened).

    Image paths are resolved against ``image_root`` (default: the file's folder); each sample's
    key is its id and its ``source`` the file and line.

    Raises:
        UnimmError: the file is missing or a record or image is invalid (file, line and reason).
    """
    return [sample for _, sample in iter_decoded_records(path, fmt, image_root)]


def iter_decoded_records(
    path: str | Path,
    fmt: str = "auto",
    image_root: str | Path | None = None,
    *,
    on_error: Callable[[UnimmError], None] | None = None,
    columns: dict[str, str] | None = None,
) -> Iterator[tuple[Record, Sample]]:
    """Stream a record file as ``(record, sample)`` pairs, one record in memory at a time.

    The record's image paths are the resolved absolute paths (confined to ``image_root``, default
    the file's folder, as in prepare); the sample has the images opened, its key is its id and its
    ``source`` the file and line. A bad record or image raises, or, with ``on_error``, is passed
    to it (located by file and line) and left out.

    Raises:
        UnimmError: the file is missing, or (without ``on_error``) a record or image is invalid.
    """
    from unimm.data.images import ImageProblem, resolve_image_source
    from unimm.data.tables import default_image_root, is_table

    path = Path(path)
    if not (path.is_file() or is_table(path)):
        raise UnimmError(f"{path}: no such file (or not a datasets folder or imagefolder)")
    root = image_root if image_root is not None else default_image_root(path)
    for item in iter_records(path, fmt, columns=columns):
        try:
            if isinstance(item, DataError):
                raise UnimmError(str(item))
            source = f"{path}:{item.line}" if item.line else str(path)
            try:
                resolved = [
                    s
                    if s.kind == "text"
                    else RecordSlice("image", resolve_image_source(s.value, root), s.role)
                    for s in item.slices
                ]
                slices = [
                    Slice.of_text(s.value, s.role)
                    if s.kind == "text"
                    else Slice.of_image(open_image(s.value), s.role)
                    for s in resolved
                ]
            except (ImageProblem, UnimmError) as exc:
                raise UnimmError(f"{source}: {exc}") from None
        except UnimmError as exc:
            if on_error is None:
                raise
            on_error(exc)
            continue
        record = dataclasses.replace(item, slices=resolved)
        sample = Sample(
            key=item.id,
            slices=slices,
            id=item.id,
            response=item.response,
            meta=item.meta,
            source=source,
            pair=item.pair,
            instruction_name=item.instruction,
        )
        yield record, sample
