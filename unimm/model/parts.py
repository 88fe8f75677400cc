"""Roles, not names: the vision encoder, the connector and the language model of any MLLM.

Image-text-to-text families name their parts differently (transformers 5)::

    family                                  vision            connector                 language model
    LLaVA-1.5/NeXT/OneVision, Mistral 3,
    Gemma 3, PaliGemma, InternVL            vision_tower      multi_modal_projector     language_model
    Qwen2-VL, Qwen2.5-VL, Qwen3-VL          visual            visual.merger             language_model
    Idefics3 (SmolVLM)                      vision_model      connector                 text_model

:func:`find_parts` finds them under the model's inner ``model`` by these names, so
``model.train_vision``/``train_projector``/``train_lm`` and the LoRA targets mean the same on
every family; a model where a part cannot be found is refused with what was looked for. The LM
head (``lm_head``) belongs to the language model for ``train_lm``.
"""

from __future__ import annotations

import dataclasses
import re

from torch import nn

from unimm.errors import UnimmError

ROLE_NAMES = {
    "vision": ("vision_tower", "visual", "vision_model"),
    "connector": ("multi_modal_projector", "connector", "visual.merger", "mm_projector"),
    "language": ("language_model", "text_model"),
}


@dataclasses.dataclass(frozen=True)
class Parts:
    """The parts of one MLLM and their dotted names in ``named_modules()`` of the model searched."""

    vision: nn.Module
    connector: nn.Module
    language: nn.Module
    names: dict[str, str]

    def lora_pattern(self, targets: list[str]) -> str:
        """A peft ``target_modules`` regex: the ``targets`` (e.g. ``q_proj``) inside the language model."""
        prefix = re.escape(self.names["language"])
        return rf"(.*\.)?{prefix}\..*\.({'|'.join(map(re.escape, targets))})$"


def _inner(model: nn.Module) -> nn.Module:
    """The model under a peft wrapper and a ``*ForConditionalGeneration`` head."""
    get = getattr(model, "get_base_model", None)
    base = get() if callable(get) else model
    return getattr(base, "model", base)


def _lookup(root: nn.Module, dotted: str) -> nn.Module | None:
    node = root
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if not isinstance(node, nn.Module):
            return None
    return node


def find_parts(model: nn.Module) -> Parts:
    """The vision encoder, connector and language model of ``model`` (see the module docstring).

    Raises:
        UnimmError: a part is missing, naming the model class and the names tried.
    """
    inner = _inner(model)
    found: dict[str, nn.Module] = {}
    names: dict[str, str] = {}
    for role, candidates in ROLE_NAMES.items():
        for dotted in candidates:
            module = _lookup(inner, dotted)
            if module is not None:
                found[role] = module
                break
        if role not in found:
            raise UnimmError(
                f"{type(inner).__name__}: no {role} part found (looked for {', '.join(candidates)}); "
                "this model family is not supported yet"
            )
    location = {id(module): name for name, module in model.named_modules()}
    for role, module in found.items():
        names[role] = location[id(module)]
    return Parts(found["vision"], found["connector"], found["language"], names)
