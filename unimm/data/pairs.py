"""Pair records: a query, the document that answers it and hard negatives, each side an
interleaved sequence of slices (docs/formats.md, "Pair records").

unimm JSON (one per line)::

    {"id": "q-1",
     "query": [{"image": "imgs/7.jpg"}, {"text": "What colour is the large shape?"}],
     "positive": [{"text": "A red square."}],
     "negatives": [[{"text": "A blue square."}], [{"image": "imgs/8.jpg"}]],
     "instruction": "vqa"}

A side is a slice list, or ``{"slices": [...], "instruction": "text"}`` to give that side its own
instruction text; the record's ``instruction`` names a task of the recipe's ``model.instructions``
(its query instruction for the query, its document instruction for the others). Also read:

- the MMEB training layout (VLM2Vec's ``qry``, ``qry_image_path``, ``pos_text``,
  ``pos_image_path``, ``neg_text``, ``neg_image_path``), as JSON Lines, CSV/TSV or Parquet; an
  ``<|image_1|>`` in a text marks where its image goes (first otherwise);
- a CSV/TSV or Parquet table with a query and a positive column (``query`` text and/or
  ``query_image``, ``positive`` and/or ``positive_image``), optional ``negative`` (and
  ``negative_2``, ``negative_3``, ...) each with or without its image column (``negative_image``,
  ``negative_2_image``, ...).

A pair is stored as one :class:`~unimm.data.records.Record` whose ``slices`` are its sides'
slices one after another and whose ``pair`` (:class:`~unimm.data.records.PairSides`) says how
many belong to each side, so that ``prepare`` encodes its images and teacher features like any
record's; :func:`split_sides` cuts a decoded sample back into its sides.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unimm.data.instructions import instruction_text
from unimm.data.records import Record, RecordSlice, failer, make_pair
from unimm.errors import DataError
from unimm.utils import seed_of

MMEB_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")
MMEB_IMAGE_TOKEN = re.compile(r"<\|image_\d+\|>")
_TABLE_NEGATIVE = re.compile(r"^negative(?:_(\d+))?(?:_image)?$")


# ---------------------------------------------------------------------------------------------
# Tables: MMEB's training layout and query/positive/negative columns


def _text_and_image(text: Any, image: Any, name: str, fail) -> list[RecordSlice]:
    """One side from a text cell and an image-path cell (either may be empty)."""
    text = text.strip() if isinstance(text, str) else ""
    image = image.strip() if isinstance(image, str) else ""
    if image and not text:
        return [RecordSlice("image", image)]
    if not image:
        if MMEB_IMAGE_TOKEN.search(text):
            raise fail(f"{name}: the text has an image placeholder but no image path is given")
        return [RecordSlice("text", text)] if text else []
    before, marker, after = _split_marker(text)
    if not marker:  # no placeholder: the image comes first, as VLM2Vec lays it out
        return [RecordSlice("image", image), RecordSlice("text", text)]
    return [
        *([RecordSlice("text", before)] if before else []),
        RecordSlice("image", image),
        *([RecordSlice("text", after)] if after else []),
    ]


def _split_marker(text: str) -> tuple[str, str, str]:
    match = MMEB_IMAGE_TOKEN.search(text)
    if match is None:
        return text, "", ""
    after = MMEB_IMAGE_TOKEN.sub("", text[match.end() :]).strip()
    return text[: match.start()].strip(), match.group(0), after


def mmeb_record(row: dict[str, Any], source: str, line: int, default_id: str) -> Record:
    """A pair record from one row of MMEB's training layout (see the module docs)."""
    columns = [("qry", "qry_image_path"), ("pos_text", "pos_image_path"), ("neg_text", "neg_image_path")]
    return _table_pair(row, columns, source, line, default_id, instruction=None)


def table_columns(header: list[str]) -> str | None:
    """Which pair layout a table header is: ``mmeb``, ``pairs`` or ``None`` (not a pair table)."""
    if "qry" in header:
        return "mmeb"
    has = set(header)
    if has & {"query", "query_image"} and has & {"positive", "positive_image"}:
        return "pairs"
    return None


def table_record(row: dict[str, Any], source: str, line: int, default_id: str) -> Record:
    """A pair record from a row with ``query``/``positive``/``negative…`` columns (module docs)."""
    negatives = {key.removesuffix("_image") for key in row if key and _TABLE_NEGATIVE.match(key)}
    numbered = sorted((int(_TABLE_NEGATIVE.match(key).group(1) or 1), key) for key in negatives)
    columns = [(key, f"{key}_image") for key in ("query", "positive", *(key for _, key in numbered))]
    instruction = row.get("instruction")
    instruction = instruction.strip() if isinstance(instruction, str) and instruction.strip() else None
    return _table_pair(row, columns, source, line, default_id, instruction=instruction)


def _table_pair(row, columns, source: str, line: int, default_id: str, *, instruction) -> Record:
    """The pair of a table row whose sides are ``(text column, image column)`` pairs, in order:
    the query, the positive, then the negatives (an empty negative is no side)."""
    rid = str(row.get("id") or default_id).strip() or default_id
    fail = failer(rid, source, line)
    sides = [_text_and_image(row.get(text), row.get(image), text, fail) for text, image in columns]
    if not sides[0]:
        raise fail(f"empty query: '{columns[0][0]}' and '{columns[0][1]}' are both empty")
    if not sides[1]:
        raise fail(f"pair record without a positive: '{columns[1][0]}' and '{columns[1][1]}' are both empty")
    kept = [(side, None) for side in sides[:2]] + [(side, None) for side in sides[2:] if side]
    return make_pair(rid, kept, fail, instruction=instruction, source=source, line=line)


def iter_parquet(path: Path) -> Iterator[Record | DataError]:
    """The pair records of a Parquet file (MMEB's training layout or query/positive columns),
    read a row group at a time (the line of a row is its number, 1 = the first row); any other
    Parquet file is an image–text table (:mod:`unimm.data.tables`)."""
    source = str(path)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        yield DataError("reading Parquet needs pyarrow: pip install 'unimm[benchmarks]'", source=source)
        return
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid for a file that is not Parquet
        yield DataError(f"not a Parquet file ({exc})", source=source)
        return
    header = [name.lower() for name in table.schema_arrow.names]
    layout = table_columns(header)
    if layout is None:  # not a pair table: an image–text one (or its error naming the columns)
        from unimm.data.tables import iter_table

        yield from iter_table(path, {})
        return
    convert = mmeb_record if layout == "mmeb" else table_record
    number = 0
    for batch in table.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            row = {str(k).lower(): v for k, v in row.items()}
            try:
                yield convert(row, source, number, f"{path.stem}-{number}")
            except DataError as exc:
                yield exc


# ---------------------------------------------------------------------------------------------
# Decoded pairs


def split_sides(sample, instructions: dict[str, dict[str, str]] | None = None, default: str = "") -> list:
    """A decoded pair sample cut into its sides (query, positive, negatives), each a
    :class:`~unimm.data.samples.Sample` with its teacher rows, its key (``KEY/q``, ``KEY/p``,
    ``KEY/n0``, ...) and its instruction text: the side's own, else the query or document
    instruction of the sample's task (``instructions``; ``default`` names the task of samples
    that name none)."""
    pair = sample.pair
    task = sample.instruction_name or default
    out = []
    for n, ((start, end), own) in enumerate(zip(pair.ranges(), pair.instructions, strict=True)):
        role = "query" if n == 0 else "document"
        teacher = None
        if sample.teacher is not None:
            teacher = {key: value[start:end] for key, value in sample.teacher.items()}
        suffix = "q" if n == 0 else "p" if n == 1 else f"n{n - 2}"
        out.append(
            sample.replace(
                key=f"{sample.key}/{suffix}",
                slices=sample.slices[start:end],
                teacher=teacher,
                pair=None,
                response=None,
                task="discriminative",
                instruction=own or instruction_text(instructions, task, role),
            )
        )
    return out


def expand_pairs(samples, collator) -> tuple[list, list[list[int]]]:
    """``samples`` with each pair record cut into its sides (:func:`split_sides`, keeping
    ``collator.hard_negatives`` of its negatives, chosen afresh each epoch and reproducibly, as
    the cut points are), and the rows of each pair's sides."""
    if not any(s.pair is not None for s in samples):
        return list(samples), []
    rows: list = []
    pairs: list[list[int]] = []
    for sample in samples:
        if sample.pair is None:
            rows.append(sample)
            continue
        query, positive, *negatives = split_sides(sample, collator.instructions, collator.default_instruction)
        chosen = _chosen_negatives(sample, len(negatives), collator.hard_negatives, collator.seed)
        pairs.append(list(range(len(rows), len(rows) + 2 + len(chosen))))
        rows += [query, positive, *(negatives[k] for k in chosen)]
    return rows, pairs


def _chosen_negatives(sample, count: int, wanted: int, seed: int) -> list[int]:
    if count <= wanted:
        return list(range(count))
    rng = random.Random(seed_of(f"{seed}/{sample.key}/negatives/{sample.epoch}"))
    return sorted(rng.sample(range(count), wanted))


def pair_views(views: list[tuple[int, int]], sides: list[list[int]]) -> list[tuple[int, int, list[int]]]:
    """Per pair, the index (in a batch's ``views``) of its query's, its positive's and its
    negatives' last view: the whole side, as retrieval embeds it. A pair one of whose sides did
    not fit the maximum length at all (no slice kept) is left out."""
    last: dict[int, int] = {}
    for index, (row, _) in enumerate(views):
        last[row] = index  # the cuts of a row are sorted: the last one is its whole kept text
    out = []
    for rows in sides:
        if all(r in last for r in rows):
            out.append((last[rows[0]], last[rows[1]], [last[r] for r in rows[2:]]))
    return out
