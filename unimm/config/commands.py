"""One config per command: which sections it takes (every section can come from a recipe)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from unimm.config.data import DataOptions, PrepareOptions, TeacherOptions
from unimm.config.inference import (
    ChatOptions,
    EmbedOptions,
    EvalOptions,
    ExportOptions,
    IndexOptions,
    MineOptions,
    PushOptions,
    RetrieveOptions,
    ServeOptions,
)
from unimm.config.model import AlignOptions, ModelOptions, TrainOptions


@dataclasses.dataclass
class PrepareConfig:
    """Configuration of ``unimm prepare``."""

    prepare: PrepareOptions = dataclasses.field(default_factory=PrepareOptions)
    teachers: TeacherOptions = dataclasses.field(default_factory=TeacherOptions)


@dataclasses.dataclass
class TrainConfig:
    """Configuration of ``unimm train``."""

    model: ModelOptions = dataclasses.field(default_factory=ModelOptions)
    data: DataOptions = dataclasses.field(default_factory=DataOptions)
    align: AlignOptions = dataclasses.field(default_factory=AlignOptions)
    train: TrainOptions = dataclasses.field(default_factory=TrainOptions)
    out: str = ""
    resume: bool = False

    def validate(self) -> list[str]:
        return [] if self.out else ["out: give a run directory with --out RUN"]


@dataclasses.dataclass
class EmbedConfig:
    """Configuration of ``unimm embed``."""

    embed: EmbedOptions = dataclasses.field(default_factory=EmbedOptions)


@dataclasses.dataclass
class IndexConfig:
    """Configuration of ``unimm index build``."""

    index: IndexOptions = dataclasses.field(default_factory=IndexOptions)


@dataclasses.dataclass
class PushConfig:
    """Configuration of ``unimm index push``."""

    push: PushOptions = dataclasses.field(default_factory=PushOptions)


@dataclasses.dataclass
class RetrieveConfig:
    """Configuration of ``unimm retrieve``."""

    retrieve: RetrieveOptions = dataclasses.field(default_factory=RetrieveOptions)


@dataclasses.dataclass
class ChatConfig:
    """Configuration of ``unimm chat``."""

    chat: ChatOptions = dataclasses.field(default_factory=ChatOptions)


@dataclasses.dataclass
class MineConfig:
    """Configuration of ``unimm mine``."""

    mine: MineOptions = dataclasses.field(default_factory=MineOptions)


@dataclasses.dataclass
class ServeConfig:
    """Configuration of ``unimm serve``."""

    serve: ServeOptions = dataclasses.field(default_factory=ServeOptions)


@dataclasses.dataclass
class ExportConfig:
    """Configuration of ``unimm export``."""

    export: ExportOptions = dataclasses.field(default_factory=ExportOptions)


@dataclasses.dataclass
class EvalConfig:
    """Configuration of ``unimm eval``."""

    eval: EvalOptions = dataclasses.field(default_factory=EvalOptions)


SECTIONS: dict[str, type] = {
    "prepare": PrepareOptions,
    "teachers": TeacherOptions,
    "model": ModelOptions,
    "data": DataOptions,
    "align": AlignOptions,
    "train": TrainOptions,
    "embed": EmbedOptions,
    "index": IndexOptions,
    "retrieve": RetrieveOptions,
    "chat": ChatOptions,
    "eval": EvalOptions,
    "serve": ServeOptions,
    "export": ExportOptions,
    "mine": MineOptions,
    "push": PushOptions,
}
"""Every recipe section and its dataclass (``RECIPE_SECTIONS`` names the same set)."""


def check_overrides(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """Problems of ``--set`` overrides on their own: syntax, unknown sections and keys, wrong types.

    For a pipeline that builds several commands' configs later (the quickstart), so that a typo
    is reported before any work; value checks that need the whole config still run per command.
    """
    from unimm.config.build import _build, _set_dotted, parse_override
    from unimm.errors import ConfigError

    problems: list[str] = []
    tree: dict = {}
    for text in overrides:
        try:
            key, value = parse_override(text)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        if key.split(".", 1)[0] not in SECTIONS or "." not in key:
            problems.append(f"--set {key}: unknown section (known: {', '.join(SECTIONS)})")
            continue
        _set_dotted(tree, key, value)
    for section, body in tree.items():
        _build(SECTIONS[section], body, f"{section}.", problems)
    return problems


def override_key(text: str) -> str:
    """The dotted key of a ``KEY=VALUE`` override (``train.lr`` of ``train.lr=1e-4``)."""
    return text.partition("=")[0].strip()


def check_settings(
    recipe: str | Path,
    overrides: list[str] | tuple[str, ...],
    *,
    owned: dict[str, str],
    sections: tuple[str, ...] | None = None,
    what: str = "",
) -> dict:
    """Check a recipe and ``--set`` overrides before a pipeline that builds configs later does any
    work; return the recipe's sections (read once).

    Args:
        owned: keys the caller sets itself, each with the reason a ``--set`` of it is refused.
        sections: the sections overrides may name (default: every section).
        what: the kind of key ``sections`` allows, for the message (e.g. ``training``).

    Raises:
        ConfigError: every problem at once (see :func:`check_overrides`).
    """
    from unimm.config.build import load_recipe
    from unimm.errors import ConfigError

    data = load_recipe(recipe)
    problems = check_overrides(overrides)
    for text in overrides:
        key = override_key(text)
        if key in owned:
            problems.append(f"--set {key}: {owned[key]}")
        elif sections is not None and key.split(".", 1)[0] not in sections:
            problems.append(f"--set {key}: not a {what} key (sections: {', '.join(sections)})")
    if problems:
        raise ConfigError(problems)
    return data
