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
