"""Task instructions (VLM2Vec / E5-V style): per task a query and a document instruction text.

The recipe names them (``model.instructions: {TASK: {query: ..., document: ...}}``,
``model.default_instruction: TASK``); checkpoints keep them (``inference.instructions``), so that
``embed``, ``retrieve``, ``serve`` and the sentence-transformers export encode exactly as training
did. An instruction is the system text of the sample it applies to (the layout's system message,
or the plain layout's text before ``USER:``), never a slice: it has no span, no cut point and no
teacher features, and a document's views stay the same slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from unimm.config.model import INSTRUCTION_ROLES

__all__ = ["INSTRUCTION_ROLES", "chosen_task", "instructed", "instruction_text", "unknown_task_message"]


def instruction_text(table: dict[str, dict[str, str]] | None, task: str | None, role: str) -> str | None:
    """The ``role`` (query or document) instruction of ``task``, or ``None`` (no task, or the task
    has none for that role)."""
    if not task or not table:
        return None
    return table.get(task, {}).get(role) or None


def chosen_task(settings: dict[str, Any], asked: str | None) -> str:
    """The instruction task a checkpoint's ``inference`` settings encode under: ``asked`` (from
    ``--instruction``; ``""`` = none), else their ``default_instruction``.

    Raises:
        UnimmError: ``asked`` is not a task of their ``instructions``.
    """
    from unimm.errors import UnimmError

    if asked is None:
        return settings["default_instruction"]
    if asked and asked not in settings["instructions"]:
        raise UnimmError(unknown_task_message(asked, settings["instructions"], "--instruction"))
    return asked


def unknown_task_message(task: str, table: dict[str, Any], where: str) -> str:
    known = ", ".join(sorted(table)) or "none: the recipe defines no model.instructions"
    return f"{where}: instruction task {task!r} is not in model.instructions (known: {known})"


def instructed(samples: Sequence, table: dict[str, dict[str, str]], task: str, role: str) -> list:
    """``samples`` under ``task``'s ``role`` (``query`` or ``document``) instruction; a sample
    that has its own instruction text keeps it. A task without that role's text gives ``""``
    (no instruction, never another default)."""
    if role not in INSTRUCTION_ROLES:
        raise ValueError(f"role must be one of {INSTRUCTION_ROLES}, got {role!r}")
    text = instruction_text(table, task, role) or ""
    return [s if s.instruction is not None else s.replace(instruction=text) for s in samples]
