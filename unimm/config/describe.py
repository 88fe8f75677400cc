"""``unimm config show``: a command's resolved configuration, each key with what it means.

The meanings are the docstrings written under each field of the section dataclasses (read from
their source once, with :mod:`ast`), so the listing and the code cannot disagree.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import json
import re
from typing import Any

from unimm.config.commands import (
    ChatConfig,
    EmbedConfig,
    EvalConfig,
    ExportConfig,
    IndexConfig,
    MineConfig,
    PrepareConfig,
    PushConfig,
    RetrieveConfig,
    ServeConfig,
    TrainConfig,
)

COMMAND_CONFIGS: dict[str, type] = {
    "prepare": PrepareConfig,
    "train": TrainConfig,
    "embed": EmbedConfig,
    "index": IndexConfig,
    "retrieve": RetrieveConfig,
    "chat": ChatConfig,
    "eval": EvalConfig,
    "serve": ServeConfig,
    "export": ExportConfig,
    "mine": MineConfig,
    "index push": PushConfig,
}
"""The commands whose configuration ``unimm config show --command NAME`` resolves."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass and its bases (the string under each field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (a frozen build): names and values only
            continue
        body = tree.body[0].body
        for node, after in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _first_sentence(text: str, width: int = 100) -> str:
    sentence = re.split(r"\.\s+(?=[A-Z`(])", text)[0].rstrip(".")  # not at "e.g. a"
    return sentence if len(sentence) <= width else sentence[: width - 1] + "…"


def describe(cfg: Any, *, full: bool = False) -> str:
    """The config as YAML-like lines ``key: value  # meaning`` (sections, then their keys);
    ``full`` gives each meaning whole rather than its first sentence."""
    lines: list[str] = []

    def walk(node: Any, indent: int) -> None:
        docs = field_docs(type(node))
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            pad = "  " * indent
            if dataclasses.is_dataclass(value):
                lines.append(f"{pad}{f.name}:")
                walk(value, indent + 1)
                continue
            text = json.dumps(value, ensure_ascii=False)
            doc = docs.get(f.name, "")
            comment = f"  # {doc if full else _first_sentence(doc)}" if doc else ""
            lines.append(f"{pad}{f.name}: {text}{comment}")

    walk(cfg, 0)
    return "\n".join(lines)
