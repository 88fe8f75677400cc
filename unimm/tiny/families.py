"""Tiny random models of each MLLM family, from the family's own transformers config and processor.

Every family here is a :class:`FamilySpec`: its special tokens, model config, image processor,
processor class and, for the families tested through their chat template, a template that lays
images out the way the released checkpoints do (Qwen's ``<|vision_start|>…<|vision_end|>``,
Gemma 3's ``<start_of_image>`` in ``<start_of_turn>`` turns, InternVL's ``<IMG_CONTEXT>`` in
ChatML, LLaVA-OneVision's images-first turns); LLaVA-NeXT, Idefics3 and PaliGemma have none, so
the plain layout is tested on them. :func:`unimm.tiny.models.save_tiny_mllm` writes them.

Processors that carry a video processor (Qwen-VL, LLaVA-OneVision, InternVL) are written as files
(``processor_config.json`` with the image and video processors' settings) rather than through
the processor class, which needs torchvision to be built at all; loading them still does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

CHATML_QWEN2 = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL's and Qwen2.5-VL's template (a default system message; images in vision markers)."""

CHATML_QWEN3 = CHATML_QWEN2.replace(
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}",
    "",
)
"""Qwen3-VL's (no default system message)."""

GEMMA3 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
"""Gemma 3's (roles alternate; the system text opens the first user turn; text is trimmed)."""

CHATML_INTERNVL = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""InternVL's (ChatML; an image is ``<IMG_CONTEXT>`` and a newline)."""

CHATML_ONEVISION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}"
    "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""LLaVA-OneVision's (every image of a turn first, then its text: not interleaved)."""


@dataclasses.dataclass
class FamilySpec:
    """How to build one family's tiny model and processor."""

    named_tokens: dict[str, str]  # tokenizer attributes (image_token, boi_token, ...)
    extra_tokens: list[str]
    eos: str
    build: Any  # (tokenizer, text config, vision dict, image_size) -> (model class, config, processor parts)


def _id(tokenizer, attribute: str) -> int:
    return tokenizer.convert_tokens_to_ids(getattr(tokenizer, attribute))


def _qwen(version: str):
    def build(tokenizer, text: dict, vision: dict, image_size: int):
        import transformers as T

        half = text["head_dim"] // 2  # M-RoPE splits the rotary half-dimension: time, height, width
        mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
        width = text["hidden_size"]  # what the merger hands the language model
        qwen_vision = {"hidden_size": 32, "num_heads": 2, "patch_size": 8, "spatial_merge_size": 2}
        ids = {
            "image_token_id": _id(tokenizer, "image_token"),
            "video_token_id": _id(tokenizer, "video_token"),
            "vision_start_token_id": _id(tokenizer, "vision_start_token"),
            "vision_end_token_id": _id(tokenizer, "vision_end_token"),
        }
        if version == "qwen2_vl":
            model_class, config_class, processor = (
                "Qwen2VLForConditionalGeneration",
                "Qwen2VLConfig",
                "Qwen2VLProcessor",
            )
            text_config = {**text, "rope_scaling": {"type": "mrope", "mrope_section": mrope}}
            vision_config = {**qwen_vision, "hidden_size": width, "depth": 1, "embed_dim": 32, "mlp_ratio": 2}
        elif version == "qwen2_5_vl":
            model_class, config_class = "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig"
            processor = "Qwen2_5_VLProcessor"
            text_config = {**text, "rope_scaling": {"type": "mrope", "mrope_section": mrope}}
            vision_config = {
                **qwen_vision,
                "depth": 1,
                "out_hidden_size": width,
                "intermediate_size": 64,
                "fullatt_block_indexes": [0],
                "window_size": 32,
            }
        else:
            model_class, config_class, processor = (
                "Qwen3VLForConditionalGeneration",
                "Qwen3VLConfig",
                "Qwen3VLProcessor",
            )
            rope = {"rope_type": "default", "mrope_section": mrope, "mrope_interleaved": True}
            text_config = {**text, "rope_scaling": rope}
            vision_config = {
                **qwen_vision,
                "depth": 2,
                "out_hidden_size": width,
                "intermediate_size": 64,
                "num_position_embeddings": 16,
                "deepstack_visual_indexes": [1],
            }
        config = getattr(T, config_class)(text_config=text_config, vision_config=vision_config, **ids)
        pixels = {"min_pixels": 16 * 16, "max_pixels": image_size * image_size}  # dynamic resolution
        image_processor = T.Qwen2VLImageProcessorPil(
            patch_size=8, merge_size=2, temporal_patch_size=2, **pixels
        )
        video = {
            "video_processor_type": processor.replace("Processor", "VideoProcessor").replace("2_5", "2"),
            "patch_size": 8,
            "merge_size": 2,
            "temporal_patch_size": 2,
            **pixels,
        }
        template = CHATML_QWEN3 if version == "qwen3_vl" else CHATML_QWEN2
        return getattr(T, model_class), config, (processor, image_processor, template, video, {})

    return build


def _gemma3(tokenizer, text: dict, vision: dict, image_size: int):
    import transformers as T

    config = T.Gemma3Config(
        vision_config=T.SiglipVisionConfig(**vision, image_size=32, patch_size=8),
        text_config=T.Gemma3TextConfig(**text),
        mm_tokens_per_image=4,
        image_token_index=_id(tokenizer, "image_token"),
        boi_token_index=_id(tokenizer, "boi_token"),
        eoi_token_index=_id(tokenizer, "eoi_token"),
    )
    image_processor = T.Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    return (
        T.Gemma3ForConditionalGeneration,
        config,
        ("Gemma3Processor", image_processor, GEMMA3, None, {"image_seq_length": 4}),
    )


def _internvl(tokenizer, text: dict, vision: dict, image_size: int):
    import transformers as T

    config = T.InternVLConfig(
        vision_config={**vision, "image_size": [32, 32], "patch_size": [8, 8]},
        text_config=T.Qwen2Config(**text),
        image_token_id=_id(tokenizer, "context_image_token"),
        downsample_ratio=0.5,
    )
    image_processor = T.GotOcr2ImageProcessorPil(
        size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    video = {"video_processor_type": "InternVLVideoProcessor", "size": {"height": 32, "width": 32}}
    parts = ("InternVLProcessor", image_processor, CHATML_INTERNVL, video, {"image_seq_length": 4})
    return T.InternVLForConditionalGeneration, config, parts


def _onevision(tokenizer, text: dict, vision: dict, image_size: int):
    import transformers as T

    pinpoints = [[32, 32], [32, 64], [64, 32]]
    config = T.LlavaOnevisionConfig(
        vision_config=T.SiglipVisionConfig(**vision, image_size=32, patch_size=8),
        text_config=T.Qwen2Config(**text),
        image_token_index=_id(tokenizer, "image_token"),
        video_token_index=_id(tokenizer, "video_token"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    image_processor = T.LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    video = {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": 32, "width": 32}}
    kwargs = {"num_image_tokens": 16, "vision_feature_select_strategy": "full"}
    return (
        T.LlavaOnevisionForConditionalGeneration,
        config,
        ("LlavaOnevisionProcessor", image_processor, CHATML_ONEVISION, video, kwargs),
    )


def _llava_next(tokenizer, text: dict, vision: dict, image_size: int):
    import transformers as T

    pinpoints = [[32, 32], [32, 64], [64, 32]]
    config = T.LlavaNextConfig(
        vision_config=T.CLIPVisionConfig(**vision, image_size=32, patch_size=8),
        text_config=T.LlamaConfig(**text),
        image_token_index=_id(tokenizer, "image_token"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
    )
    image_processor = T.LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    # CLIP's CLS token counts as one more image token, which "default" then drops
    kwargs = {"patch_size": 8, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    return (
        T.LlavaNextForConditionalGeneration,
        config,
        ("LlavaNextProcessor", image_processor, None, None, kwargs),
    )


def _idefics3(tokenizer, text: dict, vision: dict, image_size: int):
    import transformers as T

    config = T.Idefics3Config(
        vision_config={**vision, "image_size": 32, "patch_size": 8},
        text_config={**text, "model_type": "llama"},
        image_token_id=_id(tokenizer, "image_token"),
        scale_factor=2,
    )
    image_processor = T.Idefics3ImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}
    )
    parts = ("Idefics3Processor", image_processor, None, None, {"image_seq_len": 4})
    return T.Idefics3ForConditionalGeneration, config, parts


def _paligemma(tokenizer, text: dict, vision: dict, image_size: int):
    import transformers as T

    config = T.PaliGemmaConfig(
        vision_config={**vision, "model_type": "siglip_vision_model", "image_size": 32, "patch_size": 8},
        text_config={**text, "model_type": "gemma"},
        image_token_index=_id(tokenizer, "image_token"),
        projection_dim=text["hidden_size"],
    )
    image_processor = T.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16  # what PaliGemmaProcessor reads
    return (
        T.PaliGemmaForConditionalGeneration,
        config,
        ("PaliGemmaProcessor", image_processor, None, None, {}),
    )


_CHATML = ["<|im_start|>", "<|im_end|>"]
_QWEN_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}

_IMAGE = {"image_token": "<image>"}

SPECS: dict[str, FamilySpec] = {
    "llava_next": FamilySpec(_IMAGE, [], "</s>", _llava_next),
    "idefics3": FamilySpec(
        _IMAGE, ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"], "</s>", _idefics3
    ),
    "paligemma": FamilySpec(_IMAGE, [], "</s>", _paligemma),
    "qwen2_vl": FamilySpec(_QWEN_TOKENS, _CHATML, "<|im_end|>", _qwen("qwen2_vl")),
    "qwen2_5_vl": FamilySpec(_QWEN_TOKENS, _CHATML, "<|im_end|>", _qwen("qwen2_5_vl")),
    "qwen3_vl": FamilySpec(_QWEN_TOKENS, _CHATML, "<|im_end|>", _qwen("qwen3_vl")),
    "gemma3": FamilySpec(
        {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
        ["<start_of_turn>"],
        "<end_of_turn>",
        _gemma3,
    ),
    "internvl": FamilySpec(
        {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        _CHATML,
        "<|im_end|>",
        _internvl,
    ),
    "llava_onevision": FamilySpec(
        {"image_token": "<image>", "video_token": "<video>"}, _CHATML, "<|im_end|>", _onevision
    ),
}
"""Every family but LLaVA-1.5 (:func:`unimm.tiny.models.save_tiny_llava`, the quickstart's)."""
