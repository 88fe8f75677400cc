"""One config per command: which sections it takes (every section can come from a recipe)."""

from __future__ import annotations

import dataclasses

from unimm.config.data import DataOptions, PrepareOptions, TeacherOptions
from unimm.config.inference import ChatOptions, EmbedOptions, EvalOptions, RetrieveOptions
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
class RetrieveConfig:
    """Configuration of ``unimm retrieve``."""

    retrieve: RetrieveOptions = dataclasses.field(default_factory=RetrieveOptions)


@dataclasses.dataclass
class ChatConfig:
    """Configuration of ``unimm chat``."""

    chat: ChatOptions = dataclasses.field(default_factory=ChatOptions)


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
    "retrieve": RetrieveOptions,
    "chat": ChatOptions,
    "eval": EvalOptions,
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
