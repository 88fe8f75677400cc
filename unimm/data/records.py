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
RECORD_KEYS = ("id", "slices", "response", "task", "meta")
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
    """One text or image slice. ``value`` is the text, or the image path as written in the input."""

    kind: SliceKind
    value: str
    role: str = "user"


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

    @property
    def image_paths(self) -> list[str]:
        return [s.value for s in self.slices if s.kind == "image"]


def record_from_obj(obj: Any, *, source: str | None = None, line: int | None = None) -> Record:
    """Validate a decoded unimm JSON object and return a :class:`Record`.

    Raises:
        DataError: naming the source, line and record id, and what is wrong.
    """
    rid = obj.get("id") if isinstance(obj, dict) else None
    rid_text = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None

    def fail(reason: str) -> DataError:
        return DataError(reason, source=source, line=line, record_id=rid_text)

    if not isinstance(obj, dict):
        raise fail(f"a record must be a JSON object, got {type(obj).__name__}")
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
    slices = [_slice_from_obj(s, i, fail) for i, s in enumerate(slices_obj)]
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
        id=rid_text, slices=slices, response=response, meta=meta, source=source, line=line, task=task
    )


def _slice_from_obj(obj: Any, index: int, fail) -> RecordSlice:
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
    slices = []
    for s in record.slices:
        item: dict[str, Any] = {s.kind: s.value}
        if s.role != "user":
            item["role"] = s.role
        slices.append(item)
    obj: dict[str, Any] = {"id": record.id, "slices": slices}
    if record.response is not None:
        obj["response"] = record.response
    if record.task != "both":
        obj["task"] = record.task
    if record.meta:
        obj["meta"] = record.meta
    return obj
