"""``unimm mine``: hard negatives for pair records, found by the checkpoint in an index of the corpus.

    unimm mine --model RUN/step-000500 --index corpus-index --pairs pairs.jsonl --out mined.jsonl

Per pair record: its query is embedded as a query and its positive as a document (under the
checkpoint's instructions, as ``retrieve`` and ``embed`` encode them), the index is searched
``depth`` deep, and candidates are kept best first, skipping

- the record's own query, positive and negatives (documents with the same slices),
- likely false negatives: a candidate that scores above ``margin × s⁺`` (``s⁺`` the query's score
  with its own positive; ``s⁺ − (1 − margin)·|s⁺|`` when ``s⁺`` is negative) is probably an
  unlabelled positive (NV-Retriever's positive-aware TopK-PercPos filter),

until ``negatives`` are found (``--no-filter``: without the second rule, naive top-k mining).
Each record is written again with them as its ``negatives`` (after its own, unless
``keep_negatives`` is off) and ``meta.mined`` (their scores, ``s⁺``, how many candidates were
dropped as likely false negatives). The output is a JSONL file written under a temporary name one
record per line (flushed), so ``--resume`` goes on after the last complete record; it is renamed
into place when every record is done, and it never overwrites an input.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unimm.config import MineOptions
from unimm.errors import UnimmError


def false_negative_threshold(positive: float, margin: float) -> float:
    """The score above which a candidate is taken for an unlabelled positive."""
    return positive - (1.0 - margin) * abs(positive)


def choose_negatives(
    hits: list[tuple[int, float]], threshold: float, excluded: set[int], *, count: int
) -> tuple[list[tuple[int, float]], int]:
    """The first ``count`` hits (best first) that are neither ``excluded`` rows nor scored above
    ``threshold``, and how many the threshold dropped."""
    kept, dropped = [], 0
    for row, score in hits:
        if row in excluded:
            continue
        if score > threshold:
            dropped += 1
            continue
        kept.append((row, score))
        if len(kept) == count:
            break
    return kept, dropped


def _row_slices(row: dict[str, Any], index: str) -> list[tuple[str, str]]:
    if "slices" not in row:
        raise UnimmError(
            f"--index {index}: its rows come from prepared shards, which keep no image paths to write "
            "negatives with; embed the corpus from its record files (unimm embed --data corpus.jsonl)"
        )
    if any("embedded" in s for s in row["slices"]):
        raise UnimmError(
            f"--index {index}: its documents' images are held in a table (Parquet or a datasets "
            "folder), which a pair file cannot point at; mine from a corpus whose images are files"
        )
    return [(s["kind"], s["value"]) for s in row["slices"]]


class _Corpus:
    """The index's documents as slice tuples (image paths resolved), to recognise a record's
    positive and negatives among them and to write mined negatives from."""

    def __init__(self, rows: list[dict[str, Any]], index: str) -> None:
        self.slices = [tuple(_row_slices(row, index)) for row in rows]
        self.rows_of: dict[tuple, list[int]] = {}
        for n, key in enumerate(self.slices):
            self.rows_of.setdefault(_identity(key), []).append(n)

    def rows_like(self, slices: list[tuple[str, str]]) -> list[int]:
        return self.rows_of.get(_identity(slices), [])


def _identity(slices) -> tuple:
    return tuple((kind, value.strip()) for kind, value in slices)


def _relative(value: str, root: Path) -> str:
    """A resolved image path as the output writes it: relative to the image root."""
    path = Path(value)
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        raise UnimmError(
            f"corpus image {value} lies outside --image-root {root}: the mined records could not "
            "be prepared from one image root; pass an --image-root that holds both the pairs' and "
            "the corpus's images"
        ) from None


def mine(opts: MineOptions, *, progress: bool = True) -> dict[str, Any]:
    """Mine ``opts.pairs`` into ``opts.out`` (see the module docs); return a summary."""
    from unimm.outputs import claim_output

    out = Path(opts.out)
    claim_output(out, None, [opts.pairs, opts.index, opts.model])
    partial = out.with_name(f".{out.name}.partial")
    if out.exists() and not opts.overwrite:
        raise UnimmError(f"--out {out} exists; pass --overwrite to replace it, or choose another --out")
    done = _resume_count(partial) if opts.resume else 0
    if not opts.resume:
        partial.unlink(missing_ok=True)
    from unimm.inference.ann import Searcher
    from unimm.inference.session import Session

    session = Session.load(opts.model, **opts.session_options())
    searcher = Searcher.for_session(opts.index, session, opts.model, opts.backend)
    corpus = _Corpus(searcher.rows, opts.index)
    root = Path(opts.image_root or Path(opts.pairs).parent).resolve()
    summary = {"records": done, "negatives": 0, "dropped_false_negatives": 0, "short": 0, "resumed_at": done}
    try:
        with partial.open("a", encoding="utf-8") as fh:
            for batch in _batches(opts, skip=done, progress=progress):
                for line in _mine_batch(batch, session, searcher, corpus, root, opts, summary):
                    fh.write(line + "\n")
                fh.flush()
                os.fsync(fh.fileno())
    except BaseException:
        if partial.stat().st_size == 0:  # nothing to resume from: leave nothing behind
            partial.unlink()
        raise
    os.replace(partial, out)
    return summary | {"out": str(out)}


def _resume_count(partial: Path) -> int:
    """Complete records an interrupted run wrote (a torn last line is cut off), read in blocks:
    a mined file of millions of records is never held whole."""
    if not partial.is_file():
        return 0
    lines, end, at = 0, 0, 0
    with partial.open("r+b") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            lines += block.count(b"\n")
            if (last := block.rfind(b"\n")) >= 0:
                end = at + last + 1
            at += len(block)
        if end != at:
            fh.truncate(end)
    return lines


def _batches(opts: MineOptions, *, skip: int, progress: bool) -> Iterator[list]:
    from unimm.data.adapters import iter_decoded_records
    from unimm.utils import progress_bar

    batch: list = []
    seen = 0
    with progress_bar(desc="mine", unit="query", disable=not progress) as bar:
        for record, sample in iter_decoded_records(opts.pairs, opts.format, opts.image_root):
            if sample.pair is None:
                raise UnimmError(
                    f"{sample.source}: record {record.id!r} is not a pair record: unimm mine reads "
                    "records with a 'query' and a 'positive' (docs/formats.md, Pair records)"
                )
            seen += 1
            if seen <= skip:
                continue
            batch.append((record, sample))
            if len(batch) == opts.batch_size:
                yield batch
                bar.update(len(batch))
                batch = []
        if batch:
            yield batch
            bar.update(len(batch))


def _mine_batch(
    batch, session, searcher, corpus: _Corpus, root: Path, opts: MineOptions, summary
) -> Iterator[str]:
    """The output lines of one batch of ``(record, sample)`` pairs."""
    from unimm.data.pairs import split_sides
    from unimm.data.records import RecordSlice, failer, make_pair, record_to_obj

    sides = [split_sides(sample, session.instructions, session.task) for _, sample in batch]
    queries = session.embed_views([s[0] for s in sides], role="query")
    positives = session.embed_views([s[1] for s in sides], role="document")
    positive_scores = (queries * positives).sum(1).tolist()
    hits = searcher.search(queries, opts.depth)
    for (record, _), found, s_pos in zip(batch, hits, positive_scores, strict=True):
        ranges = record.pair.ranges()
        own = [[(s.kind, s.value) for s in record.slices[a:b]] for a, b in ranges]
        excluded = {r for side in own for r in corpus.rows_like(side)}  # its query, positive, negatives
        threshold = false_negative_threshold(s_pos, opts.margin) if opts.filter_false_negatives else math.inf
        kept, dropped = choose_negatives(found, threshold, excluded, count=opts.negatives)
        summary["records"] += 1
        summary["negatives"] += len(kept)
        summary["dropped_false_negatives"] += dropped
        summary["short"] += len(kept) < opts.negatives
        # the record's own paths as written (relative to the root), the mined ones made so
        written = [_as_written(record.slices[a:b], root) for a, b in ranges]
        sides_out = [(written[0], record.pair.instructions[0]), (written[1], record.pair.instructions[1])]
        if opts.keep_negatives:
            sides_out += list(zip(written[2:], record.pair.instructions[2:], strict=True))
        for row, _ in kept:
            slices = [RecordSlice(k, v if k == "text" else _relative(v, root)) for k, v in corpus.slices[row]]
            sides_out.append((slices, None))
        meta = dict(record.meta or {})
        meta["mined"] = {
            "scores": [round(s, 6) for _, s in kept],
            "positive_score": round(s_pos, 6),
            "dropped_false_negatives": dropped,
        }
        fail = failer(record.id, record.source, record.line)
        mined = make_pair(record.id, sides_out, fail, instruction=record.instruction, meta=meta)
        yield json.dumps(record_to_obj(mined), ensure_ascii=False)


def _as_written(slices, root: Path) -> list:
    """Record slices with resolved image paths made relative to the image root again."""
    from unimm.data.records import RecordSlice

    return [s if s.kind == "text" else RecordSlice("image", _relative(s.value, root), s.role) for s in slices]
