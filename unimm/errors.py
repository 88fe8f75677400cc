"""Error types for user mistakes.

Everything a user can get wrong (a record, an image, a shard, a recipe, a CLI option) raises a
subclass of :class:`UnimmError`; the CLI prints its message without a traceback. ``assert`` is
kept for internal invariants only.
"""

from __future__ import annotations


class UnimmError(Exception):
    """Base class of every error caused by user input; its message says what to fix."""


class ConfigError(UnimmError):
    """Invalid configuration: unknown keys, wrong types or invalid values (all listed at once)."""

    def __init__(self, problems: list[str], *, source: str = "configuration") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} has {len(self.problems)} problem(s):\n{lines}")


class DataError(UnimmError):
    """A problem with one input record or file, located by file, line and record id."""

    def __init__(
        self,
        reason: str,
        *,
        source: str | None = None,
        line: int | None = None,
        record_id: str | None = None,
    ) -> None:
        self.reason = reason
        self.source = source
        self.line = line
        self.record_id = record_id
        super().__init__(self.describe())

    def describe(self) -> str:
        """Return ``file:line: record 'id': reason`` with the parts that are known."""
        where = ""
        if self.source is not None:
            where = self.source if self.line is None else f"{self.source}:{self.line}"
        if self.record_id is not None:
            where = f"{where}: record {self.record_id!r}" if where else f"record {self.record_id!r}"
        return f"{where}: {self.reason}" if where else self.reason

    def as_reject(self) -> dict:
        """The row written to ``rejects.jsonl`` for this error under ``--on-error skip``."""
        return {"source": self.source, "line": self.line, "id": self.record_id, "reason": self.reason}


class ShardError(UnimmError):
    """A shard directory, shard file or shard member that cannot be used."""
