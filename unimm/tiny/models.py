"""Tiny random MLLMs built offline from real ``transformers`` configs, for tests and the quickstart.

Each builder writes an ordinary Hugging Face folder (weights, config, processor, tokenizer) that
loads with ``AutoModelForImageTextToText`` and ``AutoProcessor`` like a downloaded checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from unimm.data.collate import TESTED_TYPES
from unimm.utils import quiet_transformers

_PROJECTOR_GAIN = 0.5

_TEMPLATE_TEXTS = [
    "USER: ASSISTANT: ",
    "A chat between a curious human and an artificial intelligence assistant.",
    "What colour are the shapes? What shape is shown? How many shapes are there? Where are the shapes?",
    "one two three red green blue yellow square circle triangle squares circles triangles",
    "left right top bottom",
]


def save_tiny_llava(
    out_dir: str | Path,
    texts: list[str] | None = None,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 512,
) -> Path:
    """Write a tiny random LLaVA (CLIP vision tower + Llama LM) with an offline-trained tokenizer.

    The tokenizer is a byte-level BPE trained on ``texts`` (plus the prompt template's words), so
    any text encodes; ``<image>`` is its image token. The folder loads with
    ``AutoModelForImageTextToText`` and ``AutoProcessor`` like any LLaVA checkpoint.

    Args:
        out_dir: destination folder (created).
        texts: training texts for the tokenizer (e.g. the training set's slices and responses).
        seed: weight initialisation seed.
        image_size, patch_size: vision input size and patch size; ``(image_size/patch_size)²``
            image tokens per image.
        hidden_size, num_layers: the language model's width and depth.
        vocab_size: BPE vocabulary size (at most; small corpora give fewer merges).

    Returns:
        The folder.
    """
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor

    quiet_transformers()
    out = Path(out_dir)
    tokenizer = train_tiny_tokenizer([*_TEMPLATE_TEXTS, *(texts or [])], vocab_size)
    config = _llava_config(tokenizer, image_size, patch_size, hidden_size, num_layers)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    _rescale_projector(model.model.multi_modal_projector)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    square = {"height": image_size, "width": image_size}
    LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=square),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(out)
    return out


def train_tiny_tokenizer(
    texts: list[str],
    vocab_size: int,
    image_token: str = "<image>",
    *,
    named: dict[str, str] | None = None,
    extra: list[str] | None = None,
    eos: str = "</s>",
):
    """A byte-level BPE tokenizer trained on ``texts`` (any text encodes).

    ``image_token`` (or ``named``: tokenizer attributes such as ``image_token``/``boi_token`` →
    token) and ``extra`` are special tokens; ``eos`` the end-of-sequence token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    named = dict(named) if named is not None else {"image_token": image_token}
    specials = list(dict.fromkeys(["<unk>", "<s>", "</s>", "<pad>", eos, *named.values(), *(extra or [])]))
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token=eos,
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=named,
        model_max_length=4096,
    )
    if extra:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra)})
    return tokenizer


def _llava_config(tokenizer, image_size: int, patch_size: int, hidden_size: int, num_layers: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=image_size,
            patch_size=patch_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def _rescale_projector(projector: torch.nn.Module) -> None:
    # The projector at the default init (std 0.02) feeds the LM near-constant image tokens, and a
    # tiny LM then learns the caption prior for hundreds of steps before it looks at the image
    # (synthetic captions: held-out loss 0.44 after 500 steps); unit-scale outputs make the
    # image visible from the start (0.16).
    with torch.no_grad():
        for layer in projector.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, _PROJECTOR_GAIN / layer.in_features**0.5)
                layer.bias.zero_()


FAMILIES = TESTED_TYPES
"""Families :func:`save_tiny_mllm` builds: the tested ones. Mistral 3 is not among them: its
processor (Pixtral's) cannot even be imported without torchvision, which these machines lack."""


def save_tiny_mllm(
    out_dir: str | Path,
    family: str,
    texts: list[str] | None = None,
    *,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    image_size: int = 64,
) -> Path:
    """Write a tiny random model of ``family`` (see :data:`FAMILIES`) with its own processor.

    Built from the family's transformers config (a language model of ``num_layers`` × ``hidden_size``,
    2 × 32 by default; ``hidden_size`` a multiple of 16) and
    processor class, with a byte-level BPE tokenizer trained on ``texts`` and, for the families
    with chat templates, a template laid out like the family's released checkpoints; loads with
    ``AutoModelForImageTextToText`` and ``AutoProcessor`` like a downloaded checkpoint (the
    Qwen-VL, LLaVA-OneVision and InternVL processors need torchvision to load, as anywhere).
    ``image_size``: the largest image side Qwen-VL's dynamic resolution keeps (8-pixel patches
    merged 2 × 2: 16 image tokens at 64); the other families' vision towers take 32 pixels.
    """
    from unimm.tiny.families import SPECS

    if family == "llava":
        return save_tiny_llava(out_dir, texts, seed=seed, hidden_size=hidden_size, num_layers=num_layers)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if hidden_size % 16 or num_layers < 1:
        raise ValueError(
            f"hidden_size must be a multiple of 16 and num_layers >= 1, got {hidden_size}, {num_layers}"
        )
    quiet_transformers()
    corpus = [*_TEMPLATE_TEXTS, *(texts or [])]
    spec = SPECS[family]
    tokenizer = train_tiny_tokenizer(
        corpus, 512, named=spec.named_tokens, extra=spec.extra_tokens, eos=spec.eos
    )
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden_size // 4,
        "max_position_embeddings": 4096,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    out = Path(out_dir)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    model_class, config, parts = spec.build(tokenizer, text, vision, image_size)
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    _save_processor(out, tokenizer, *parts)
    return out


def _save_processor(
    out: Path, tokenizer, processor_class: str, image_processor, template, video, kwargs
) -> None:
    """Save a processor: through its class, or (when it carries a video processor, which needs
    torchvision to be built) as the files its class would write."""
    import json

    import transformers as T

    if video is None:
        processor = getattr(T, processor_class)(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=template, **kwargs
        )
        processor.save_pretrained(out)
        return
    tokenizer.save_pretrained(out)
    settings = image_processor.to_dict()
    settings["image_processor_type"] = settings["image_processor_type"].removesuffix("Pil")
    config = {
        "processor_class": processor_class,
        "image_processor": settings,
        "video_processor": video,
        **kwargs,
    }
    (out / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").write_text(template)
