"""The one typed config tree: every section of every command, and how a config is built.

    unimm prepare data.jsonl --out shards --recipe tiny-cpu --set prepare.workers=2

Each command has one config dataclass (:mod:`unimm.config.commands`) made of section dataclasses
(:mod:`~unimm.config.data`: ``prepare``, ``teachers``, ``data``; :mod:`~unimm.config.model`:
``model``, ``align``, ``train``; :mod:`~unimm.config.inference`: ``embed``, ``retrieve``,
``chat``, ``eval``). A recipe is a YAML document whose top-level keys are section names, so one
recipe drives several commands; :func:`build_config` merges defaults <- recipe <- CLI options <-
``--set`` overrides and reports every problem at once (:mod:`unimm.config.build`).
"""

from unimm.config.build import (
    RECIPE_SECTIONS,
    SHIPPED_RECIPES,
    build_config,
    config_to_dict,
    load_recipe,
    parse_override,
    recipe_description,
    resolve_recipe,
    shipped_recipes,
)
from unimm.config.commands import (
    SECTIONS,
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
from unimm.config.data import DataOptions, PrepareOptions, TeacherOptions
from unimm.config.inference import (
    TASKS,
    ChatOptions,
    CheckpointOptions,
    EmbedOptions,
    EvalOptions,
    ExportOptions,
    IndexOptions,
    MineOptions,
    RetrieveOptions,
    ServeOptions,
)
from unimm.config.model import AlignOptions, ModelOptions, TrainOptions

__all__ = [
    "RECIPE_SECTIONS",
    "SECTIONS",
    "SHIPPED_RECIPES",
    "TASKS",
    "AlignOptions",
    "ChatConfig",
    "ChatOptions",
    "CheckpointOptions",
    "DataOptions",
    "EmbedConfig",
    "EmbedOptions",
    "EvalConfig",
    "EvalOptions",
    "ExportConfig",
    "ExportOptions",
    "IndexConfig",
    "IndexOptions",
    "MineConfig",
    "MineOptions",
    "ModelOptions",
    "PrepareConfig",
    "PrepareOptions",
    "PushConfig",
    "RetrieveConfig",
    "RetrieveOptions",
    "ServeConfig",
    "ServeOptions",
    "TeacherOptions",
    "TrainConfig",
    "TrainOptions",
    "build_config",
    "config_to_dict",
    "load_recipe",
    "parse_override",
    "recipe_description",
    "resolve_recipe",
    "shipped_recipes",
]
