"""The unimm record: an interleaved sequence of text and image slices plus an optional response.

JSONL, one record per line (docs/formats.md)::

    {"id": "doc-1", "slices": [{"text": "A red square."}, {"image": "imgs/a.jpg"}], "response": "..."}

A slice may carry ``"role": "user" | "assistant"`` (default ``user``): adapters use it for the
earlier turns of multi-turn conversations, which are context, not training targets. Extra
fields belong under ``"meta"`` (kept in the shard); any other key is reported, so a typo such as
``"reponse"`` cannot silently drop data.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from unimm.errors import DataError

SliceKind = Literal["text", "image"]
ROLES = ("user", "assistant")
RECORD_KEYS = ("id", "slices", "response", "task", "instruction", "meta")
PAIR_KEYS = ("id", "query", "positive", "negatives", "instruction", "meta")
"""The keys of a pair record (query, positive, hard negatives; :mod:`unimm.data.pairs`)."""
TASKS = ("both", "generative", "discriminative")
"""Which losses a record trains: both (the default), the next-token loss only, or the alignment loss only."""


@dataclasses.dataclass(frozen=True)
class RecordLimits:
    """What one input record may hold, so that no single line can crash or stall a run
    (``prepare.max_*``; docs/formats.md). A record past a limit is a bad record like any other."""

    depth: int = 32
    """Nesting of JSON objects and arrays (a record needs 4)."""
    number_digits: int = 64
    """Digits of a JSON number (Python refuses integers over 4300 digits with its own error)."""
    text_chars: int = 1_000_000
    """Characters of one string field (text, path, id) or CSV field."""
    slices: int = 4096
    """Slices of one record."""


@dataclasses.dataclass(frozen=True)
class RecordSlice:
    """One text or image slice. ``value`` is the text, or the image path as written in the input
    (an image held in a table: a :class:`unimm.data.tables.EmbeddedImage`)."""

    kind: SliceKind
    value: str
    role: str = "user"


@dataclasses.dataclass(frozen=True)
class PairSides:
    """How a pair record's slices divide into its sides (:mod:`unimm.data.pairs`): the query's,
    the positive's, then each hard negative's, one after another."""

    counts: tuple[int, ...]
    """Slices of the query, of the positive and of each negative (every count >= 1)."""
    instructions: tuple[str | None, ...]
    """Per side, an instruction text written in the record itself (``None``: the task's)."""

    @property
    def negatives(self) -> int:
        return len(self.counts) - 2

    def ranges(self) -> list[tuple[int, int]]:
        """``(start, end)`` slice ranges of the sides, in order."""
        out, at = [], 0
        for count in self.counts:
            out.append((at, at + count))
            at += count
        return out

    def to_obj(self) -> dict[str, Any]:
        return {"sides": list(self.counts), "instructions": list(self.instructions)}

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> PairSides:
        counts = tuple(int(c) for c in obj["sides"])
        instructions = tuple(obj.get("instructions") or [None] * len(counts))
        if len(counts) < 2 or min(counts) < 1 or len(instructions) != len(counts):
            raise ValueError(f"a pair header needs >= 2 sides of >= 1 slice, got {obj!r:.80}")
        return cls(counts, instructions)


@dataclasses.dataclass
class Record:
    """A validated record and where it came from (for error messages and provenance)."""

    id: str
    slices: list[RecordSlice]
    response: str | None = None
    meta: dict[str, Any] | None = None
    source: str | None = None
    line: int | None = None
    task: str = "both"
    """The losses it trains (:data:`TASKS`): in the paper's terms, generative data, discriminative
    data, or both."""
    instruction: str | None = None
    """The name of the recipe's instruction task (``model.instructions``) it is embedded under."""
    pair: PairSides | None = None
    """A pair record (query, positive, hard negatives): how ``slices`` divide into its sides."""

    @property
    def image_paths(self) -> list[str]:
        return [s.value for s in self.slices if s.kind == "image"]


def record_from_obj(obj: Any, *, source: str | None = None, line: int | None = None) -> Record:
    """Validate a decoded unimm JSON object and return a :class:`Record`.

    Raises:
        DataError: naming the source, line and record id, and what is wrong.
    """
    rid_text = id_text(obj)
    fail = failer(rid_text, source, line)
    if not isinstance(obj, dict):
        raise fail(f"a record must be a JSON object, got {type(obj).__name__}")
    if "query" in obj or "positive" in obj:
        return pair_record_from_obj(obj, source=source, line=line)
    unknown = sorted(k for k in obj if k not in RECORD_KEYS)
    if unknown:
        raise fail(
            f"unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(RECORD_KEYS)}); "
            "put extra fields under 'meta'"
        )
    if rid_text is None or not rid_text.strip():
        raise fail("missing or invalid 'id': give a non-empty string")
    slices_obj = obj.get("slices")
    if not isinstance(slices_obj, list):
        raise fail('\'slices\' must be a list of {"text": ...} or {"image": ...} objects')
    if not slices_obj:
        raise fail("'slices' is empty: a record needs at least one text or image slice")
    slices = [slice_from_obj(s, i, fail) for i, s in enumerate(slices_obj)]
    response = obj.get("response")
    if response is not None and not isinstance(response, str):
        raise fail(f"'response' must be a string or null, got {type(response).__name__}")
    if isinstance(response, str) and not response.strip():
        response = None
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise fail(f"'meta' must be an object, got {type(meta).__name__}")
    task = obj.get("task", "both")
    if task not in TASKS:
        raise fail(f"'task' must be one of {', '.join(TASKS)}, got {task!r}")
    return Record(
        id=rid_text,
        slices=slices,
        response=response,
        meta=meta,
        source=source,
        line=line,
        task=task,
        instruction=instruction_name(obj, fail),
    )


def instruction_name(obj: dict, fail) -> str | None:
    """A record's ``instruction``: the name of a task in the recipe's ``model.instructions``."""
    name = obj.get("instruction")
    if name is None:
        return None
    if not isinstance(name, str) or not name.strip():
        raise fail("'instruction' must name a task of the recipe's model.instructions (a string)")
    return name


def slice_from_obj(obj: Any, index: int, fail) -> RecordSlice:
    if not isinstance(obj, dict):
        raise fail(f'slice {index} must be an object like {{"text": ...}}, got {type(obj).__name__}')
    role = obj.get("role", "user")
    if role not in ROLES:
        raise fail(f"slice {index}: 'role' must be one of {', '.join(ROLES)}, got {role!r}")
    kinds = [k for k in obj if k != "role"]
    if kinds not in (["text"], ["image"]):
        raise fail(f"slice {index} has keys {sorted(kinds)}; a slice has exactly one of 'text' or 'image'")
    kind = kinds[0]
    value = obj[kind]
    if not isinstance(value, str):
        raise fail(f"slice {index}: '{kind}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise fail(f"slice {index}: '{kind}' is empty")
    return RecordSlice(kind=kind, value=value, role=role)


def record_to_obj(record: Record) -> dict[str, Any]:
    """The unimm JSON object of a record (the inverse of :func:`record_from_obj`)."""
    if record.pair is not None:
        return pair_record_to_obj(record)
    obj: dict[str, Any] = {"id": record.id, "slices": slices_to_obj(record.slices)}
    if record.response is not None:
        obj["response"] = record.response
    if record.task != "both":
        obj["task"] = record.task
    if record.instruction is not None:
        obj["instruction"] = record.instruction
    if record.meta:
        obj["meta"] = record.meta
    return obj


def slices_to_obj(slices: list[RecordSlice]) -> list[dict[str, Any]]:
    """The JSON ``slices`` list of record slices."""
    out = []
    for s in slices:
        item: dict[str, Any] = {s.kind: s.value}
        if s.role != "user":
            item["role"] = s.role
        out.append(item)
    return out


# ---------------------------------------------------------------------------------------------
# Pair records (the format: unimm.data.pairs)


def id_text(obj: Any) -> str | None:
    """A decoded record's ``id`` as text (a string or an integer), else ``None``."""
    rid = obj.get("id") if isinstance(obj, dict) else None
    return str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None


def failer(rid: str | None, source: str | None, line: int | None):
    """``reason -> DataError`` located at the record."""

    def fail(reason: str) -> DataError:
        return DataError(reason, source=source, line=line, record_id=rid)

    return fail


def pair_record_from_obj(obj: dict, *, source: str | None = None, line: int | None = None) -> Record:
    """Validate a unimm pair object (see the module docs) and return its record.

    Raises:
        DataError: naming the source, line and record id: a missing query or positive, a bad
            side, or a negative identical to the positive.
    """
    rid_text = id_text(obj)
    fail = failer(rid_text, source, line)
    unknown = sorted(k for k in obj if k not in PAIR_KEYS)
    if unknown:
        raise fail(
            f"pair record: unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(PAIR_KEYS)}); "
            "put extra fields under 'meta'"
        )
    if rid_text is None or not rid_text.strip():
        raise fail("missing or invalid 'id': give a non-empty string")
    for side in ("query", "positive"):
        if obj.get(side) is None:
            what = "the query" if side == "query" else "the document that answers the query"
            raise fail(f"pair record without '{side}': give {what} as a list of slices")
    negatives = obj.get("negatives", [])
    if not isinstance(negatives, list) or any(
        isinstance(n, dict) and ("text" in n or "image" in n) for n in negatives
    ):
        raise fail(
            "'negatives' must be a list of sides, each a list of slices (wrap a single negative "
            'in a list: [[{"text": ...}]])'
        )
    sides = [_side(obj["query"], "query", fail), _side(obj["positive"], "positive", fail)]
    sides += [_side(n, f"negatives[{k}]", fail) for k, n in enumerate(negatives)]
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise fail(f"'meta' must be an object, got {type(meta).__name__}")
    return make_pair(
        rid_text, sides, fail, instruction=instruction_name(obj, fail), meta=meta, source=source, line=line
    )


def make_pair(
    rid: str,
    sides: list[tuple[list[RecordSlice], str | None]],
    fail,
    *,
    instruction: str | None = None,
    meta: dict | None = None,
    source: str | None = None,
    line: int | None = None,
) -> Record:
    """The record of a pair whose sides are ``(slices, instruction text)``; a negative that is
    the positive again is refused (it would be its own negative)."""
    positive = _identity(sides[1][0])
    for k, (slices, _) in enumerate(sides[2:]):
        if _identity(slices) == positive:
            raise fail(f"negative {k} is identical to the positive; remove it (or mine again)")
    return Record(
        id=rid,
        slices=[s for slices, _ in sides for s in slices],
        meta=meta,
        source=source,
        line=line,
        task="discriminative",
        instruction=instruction,
        pair=PairSides(tuple(len(s) for s, _ in sides), tuple(i for _, i in sides)),
    )


def _identity(slices: list[RecordSlice]) -> tuple:
    return tuple((s.kind, s.value.strip()) for s in slices)


def _side(value: Any, name: str, fail) -> tuple[list[RecordSlice], str | None]:
    instruction = None
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"slices", "instruction"})
        if unknown:
            raise fail(f"{name}: unknown key(s) {unknown}; a side is a slice list or {{slices, instruction}}")
        instruction = value.get("instruction")
        if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
            raise fail(f"{name}.instruction must be a non-empty string (the instruction text)")
        value = value.get("slices")
    if not isinstance(value, list) or not value:
        raise fail(f'{name} must be a non-empty list of {{"text": ...}} or {{"image": ...}} slices')
    slices = [slice_from_obj(s, i, lambda reason: fail(f"{name}: {reason}")) for i, s in enumerate(value)]
    return slices, instruction


def pair_record_to_obj(record: Record) -> dict[str, Any]:
    """The unimm JSON object of a pair record (the inverse of :func:`pair_record_from_obj`)."""
    assert record.pair is not None
    sides = []
    for (start, end), instruction in zip(record.pair.ranges(), record.pair.instructions, strict=True):
        slices = slices_to_obj(record.slices[start:end])
        sides.append({"slices": slices, "instruction": instruction} if instruction else slices)
    obj: dict[str, Any] = {"id": record.id, "query": sides[0], "positive": sides[1], "negatives": sides[2:]}
    if record.instruction is not None:
        obj["instruction"] = record.instruction
    if record.meta:
        obj["meta"] = record.meta
    return obj
