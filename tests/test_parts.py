"""Roles, not names: the parts of eleven MLLM families are found, LoRA lands in the language model.

Tiny random models are built from each family's transformers config (no processor is needed to
find parts); the expected names are the families' own (transformers 5).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import transformers as T
from torch import nn

from unimm.errors import UnimmError
from unimm.model.parts import find_parts

text = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    head_dim=8,
)
clipv = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
)
sigv = clipv  # SigLIP's vision config takes the same keys
qwenv = dict(hidden_size=32, num_heads=2, patch_size=8, spatial_merge_size=2)
mrope = {"type": "mrope", "mrope_section": [1, 1, 2]}
FAMILIES = {
    "llava": lambda: T.LlavaForConditionalGeneration(
        T.LlavaConfig(vision_config=T.CLIPVisionConfig(**clipv), text_config=T.LlamaConfig(**text))
    ),
    "llava_next": lambda: T.LlavaNextForConditionalGeneration(
        T.LlavaNextConfig(
            vision_config=T.CLIPVisionConfig(**clipv),
            text_config=T.LlamaConfig(**text),
            image_grid_pinpoints=[[32, 32], [32, 64]],
        )
    ),
    "llava_onevision": lambda: T.LlavaOnevisionForConditionalGeneration(
        T.LlavaOnevisionConfig(
            vision_config=T.SiglipVisionConfig(**sigv),
            text_config=T.Qwen2Config(**text),
            image_grid_pinpoints=[[32, 32], [32, 64]],
        )
    ),
    "qwen2_vl": lambda: T.Qwen2VLForConditionalGeneration(
        T.Qwen2VLConfig(
            text_config=dict(text, rope_scaling=mrope),
            vision_config=dict(qwenv, depth=1, embed_dim=32, mlp_ratio=2),
        )
    ),
    "qwen2_5_vl": lambda: T.Qwen2_5_VLForConditionalGeneration(
        T.Qwen2_5_VLConfig(
            text_config=dict(text, rope_scaling=mrope),
            vision_config=dict(
                qwenv, depth=1, out_hidden_size=32, intermediate_size=64, fullatt_block_indexes=[0]
            ),
        )
    ),
    "qwen3_vl": lambda: T.Qwen3VLForConditionalGeneration(
        T.Qwen3VLConfig(
            text_config=dict(
                text,
                rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2], "mrope_interleaved": True},
            ),
            vision_config=dict(
                qwenv,
                depth=2,
                out_hidden_size=32,
                intermediate_size=64,
                num_position_embeddings=16,
                deepstack_visual_indexes=[1],
            ),
        )
    ),
    "idefics3": lambda: T.Idefics3ForConditionalGeneration(
        T.Idefics3Config(
            vision_config=clipv,
            text_config=dict(text, model_type="llama"),
            scale_factor=2,
        )
    ),
    "gemma3": lambda: T.Gemma3ForConditionalGeneration(
        T.Gemma3Config(
            vision_config=T.SiglipVisionConfig(**sigv),
            text_config=T.Gemma3TextConfig(**text),
            mm_tokens_per_image=4,
        )
    ),
    "paligemma": lambda: T.PaliGemmaForConditionalGeneration(
        T.PaliGemmaConfig(vision_config=T.SiglipVisionConfig(**sigv), text_config=T.GemmaConfig(**text))
    ),
    "internvl": lambda: T.InternVLForConditionalGeneration(
        T.InternVLConfig(
            vision_config=dict(clipv, image_size=[32, 32], patch_size=[8, 8]),
            text_config=T.Qwen2Config(**text),
        )
    ),
    "mistral3": lambda: T.Mistral3ForConditionalGeneration(
        T.Mistral3Config(
            vision_config=T.PixtralVisionConfig(
                image_size=32,
                patch_size=8,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                head_dim=16,
            ),
            text_config=T.MistralConfig(**text),
            spatial_merge_size=2,
        )
    ),
}

LLAVA_NAMES = ("model.vision_tower", "model.multi_modal_projector", "model.language_model")
QWEN_NAMES = ("model.visual", "model.visual.merger", "model.language_model")
EXPECTED = {name: LLAVA_NAMES for name in FAMILIES}
EXPECTED.update({name: QWEN_NAMES for name in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")})
EXPECTED["idefics3"] = ("model.vision_model", "model.connector", "model.text_model")


def _build(family: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FAMILIES[family]()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parts_and_lora_targets_of_every_family(family):
    model = _build(family)
    parts = find_parts(model)
    assert (parts.names["vision"], parts.names["connector"], parts.names["language"]) == EXPECTED[family]
    pattern = parts.lora_pattern(["q_proj", "v_proj"])
    hits = sorted(n for n, _ in model.named_modules() if re.fullmatch(pattern, n))
    layers = range(text["num_hidden_layers"])
    lm = parts.names["language"]
    assert hits == sorted(f"{lm}.layers.{i}.self_attn.{p}" for i in layers for p in ("q_proj", "v_proj"))


def test_lora_and_trainable_parts_on_idefics3_and_qwen2_vl():
    """The LoRA pattern reaches peft (0 modules matched on Idefics3 before); train_* flags pick
    each family's own parts."""
    from peft import LoraConfig, get_peft_model

    from unimm.config import ModelOptions
    from unimm.model.core import RetrievalHead, UnimmModel
    from unimm.training.trainer import _set_trainable

    idefics = _build("idefics3")
    pattern = find_parts(idefics).lora_pattern(["q_proj", "v_proj"])
    wrapped = get_peft_model(idefics, LoraConfig(r=2, lora_alpha=4, target_modules=pattern))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in wrapped.named_modules() if n.endswith(".lora_A")}
    assert len(adapted) == 4 and all(".text_model.layers." in n for n in adapted)

    qwen = _build("qwen2_vl")
    model = UnimmModel(qwen, RetrievalHead(32, 8))
    trainable = lambda: {n for n, p in model.mllm.named_parameters() if p.requires_grad}  # noqa: E731
    _set_trainable(model, ModelOptions(tiny=True, lora=False), lora_done=False)
    assert not trainable()  # the default: LoRA (none here) and the head only
    _set_trainable(model, ModelOptions(tiny=True, lora=False, train_projector=True), lora_done=False)
    assert trainable() and all(n.startswith("model.visual.merger.") for n in trainable())
    _set_trainable(model, ModelOptions(tiny=True, lora=False, train_vision=True), lora_done=False)
    assert trainable() == {n for n, _ in qwen.named_parameters() if n.startswith("model.visual.")}
    options = ModelOptions(tiny=True, lora=False, train_projector=False, train_lm=True)
    _set_trainable(model, options, lora_done=False)
    lm = {n for n, _ in qwen.named_parameters() if n.startswith(("model.language_model.", "lm_head."))}
    assert trainable() == lm
    assert all(p.requires_grad for p in model.head.parameters())


def test_image_token_id_by_either_name():
    from unimm.model.core import RetrievalHead, UnimmModel

    qwen = _build("qwen2_vl")
    assert getattr(qwen.config, "image_token_index", None) is None
    assert UnimmModel(qwen, RetrievalHead(32, 8)).image_token_id == qwen.config.image_token_id


def test_a_model_without_the_parts_is_refused():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.language_model = nn.Linear(2, 2)

    with pytest.raises(UnimmError, match=r"Module: no vision part found \(looked for vision_tower, visual"):
        find_parts(Plain())
