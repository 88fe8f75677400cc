"""Tiny random teacher encoders (DINOv2, BERT, CLIP) built offline, optionally fitted.

``save_tiny_teachers(out_dir)`` writes three ordinary Hugging Face model folders that
``unimm prepare --teacher-image-expert/--teacher-text-expert/--teacher-clip`` accept::

    python -c "from unimm.tiny import save_tiny_teachers; save_tiny_teachers('teachers')"
    unimm prepare data.jsonl --out shards --teacher-image-expert teachers/image_expert \
        --teacher-text-expert teachers/text_expert --teacher-clip teachers/clip

The widths differ on purpose (image expert 32, text expert 48, CLIP 24) so that zero padding
of ``u`` is exercised. Nothing is downloaded: tokenizers are built from a fixed vocabulary.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from unimm.tiny.fit import fit_tiny_clip, fit_tiny_expert
from unimm.utils import quiet_transformers

_WORDS = (
    "a an the of and in on at to is are with red green blue yellow white black square circle "
    "triangle left right top bottom small big one two three four image photo picture shows "
    "there what which color shape where how many"
).split()


# With transformers' default init (std 0.02) a random encoder gives nearly the same feature for
# every input (cosine ≈ 0.998 between synthetic scenes, 0.99998 between captions), which would
# tell the student that all images (and all texts) are alike; std 1.0 and two layers spread them.
_TEACHER_INIT = 1.0
_CLIP_LENGTH = 48  # characters + 2: the longest synthetic caption is 36


def _bert_vocab() -> dict[str, int]:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens += chars + [f"##{c}" for c in string.ascii_lowercase + string.digits] + _WORDS
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def _clip_vocab() -> tuple[dict[str, int], list[str]]:
    # Byte-level BPE over printable ASCII; CLIP marks word ends with "</w>". No merges: every
    # character is a token, which is all a random tiny model needs.
    chars = [c for c in string.printable if not c.isspace()]
    tokens = chars + [f"{c}</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, []


def save_tiny_teachers(
    out_dir: str | Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    fit_pairs: tuple[list, list[str]] | None = None,
    fit_steps: int = 400,
    fit_experts: bool = False,
) -> dict[str, Path]:
    """Write tiny ``image_expert/``, ``text_expert/`` and ``clip/`` folders into ``out_dir``.

    Without ``fit_pairs`` the three are random networks. With ``fit_pairs`` (images, captions)
    CLIP is first trained contrastively on them (:func:`fit_tiny_clip`), so that — like a real
    CLIP on real data — its image and text embeddings of one scene agree; a random CLIP relates
    images and texts arbitrarily, and its cross-modal targets are noise. With ``fit_experts`` the
    image and text experts are fitted too, each within its modality (:func:`fit_tiny_expert`:
    the same scene re-rendered or re-phrased is a positive). The quickstart fits CLIP only: on
    the synthetic set the fitted experts made the tiny student learn less in the same steps
    (docs/benchmarks.md, the ablation).

    Args:
        out_dir: destination folder (created).
        seed: weight initialisation seed.
        image_size: input resolution of both vision encoders.
        fit_pairs: ``(images, captions)`` to fit the teachers on (PIL images, same length).
        fit_steps: optimisation steps of each fit.
        fit_experts: also fit the image and text experts on ``fit_pairs``.

    Returns:
        ``{"image_expert": path, "text_expert": path, "clip": path}``.
    """
    quiet_transformers()
    out = Path(out_dir)
    paths = {name: out / name for name in ("image_expert", "text_expert", "clip")}
    torch.manual_seed(seed)  # one stream for the three, built and fitted in this order
    # Networks to be fitted start from the usual small init (std 1.0 does not train); random
    # ones need the large init to tell inputs apart (see _TEACHER_INIT).
    experts = fit_pairs if fit_experts else None
    init = 0.02 if experts is not None else _TEACHER_INIT
    _save_image_expert(paths["image_expert"], image_size, init, experts, fit_steps, seed)
    _save_text_expert(paths["text_expert"], init, experts, fit_steps, seed)
    init = 0.02 if fit_pairs is not None else _TEACHER_INIT
    _save_clip(paths["clip"], image_size, init, fit_pairs, fit_steps, seed)
    return paths


def _pil_image_processors():
    # The PIL image processors need no torchvision (which has no CPU wheel here); the saved
    # folders load with AutoImageProcessor either way.
    try:
        from transformers import BitImageProcessorPil as BitImageProcessor
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:  # older transformers
        from transformers import BitImageProcessor, CLIPImageProcessor
    return BitImageProcessor, CLIPImageProcessor


def _save_image_expert(
    folder: Path, image_size: int, init: float, fit_pairs, fit_steps: int, seed: int
) -> None:
    """A tiny DINOv2; fitted within its modality when ``fit_pairs`` is given."""
    from transformers import Dinov2Config, Dinov2Model

    bit_processor, _ = _pil_image_processors()
    dinov2 = Dinov2Model(
        Dinov2Config(
            image_size=image_size,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            initializer_range=init,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    square = {"height": image_size, "width": image_size}
    image_processor = bit_processor(size={"shortest_edge": image_size}, crop_size=square)
    if fit_pairs is not None:
        images, captions = fit_pairs
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
        fit_tiny_expert(
            dinov2,
            lambda idx: dinov2(pixel_values=pixels[idx]).pooler_output,
            captions,
            steps=fit_steps,
            seed=seed,
        )
    dinov2.save_pretrained(folder)
    image_processor.save_pretrained(folder)


def _save_text_expert(folder: Path, init: float, fit_pairs, fit_steps: int, seed: int) -> None:
    """A tiny BERT (CLS pooling); fitted within its modality when ``fit_pairs`` is given."""
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = _bert_vocab()
    bert = BertModel(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=48,
            num_hidden_layers=2,
            initializer_range=init,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    )
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=128)
    if fit_pairs is not None:
        # The same scene in the phrasings the data uses ("two red circles…", "Then, two red circles….")
        scenes = sorted(set(fit_pairs[1]))
        texts = [t for c in scenes for t in (c, f"First, {c}.", f"Then, {c}.", f"Finally, {c}.")]
        labels = [c for c in scenes for _ in range(4)]
        tokens = tokenizer(texts, return_tensors="pt", padding=True)
        fit_tiny_expert(
            bert,
            lambda idx: bert(**{k: v[idx] for k, v in tokens.items()}).last_hidden_state[:, 0],
            labels,
            steps=fit_steps,
            lr=3e-3,  # at 1e-3 the text expert is still near chance after 400 steps
            seed=seed,
        )
    bert.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _save_clip(folder: Path, image_size: int, init: float, fit_pairs, fit_steps: int, seed: int) -> None:
    """A tiny CLIP; fitted contrastively on ``fit_pairs`` when given."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    _, clip_image_processor = _pil_image_processors()
    clip_vocab, merges = _clip_vocab()
    tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=merges, model_max_length=_CLIP_LENGTH)
    tower = {"initializer_range": init, "initializer_factor": init / 0.02}  # CLIP scales its init by this
    clip = CLIPModel(
        CLIPConfig(
            text_config={
                "vocab_size": len(clip_vocab),
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                **tower,
                "num_attention_heads": 2,
                "max_position_embeddings": _CLIP_LENGTH,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
            vision_config={
                "image_size": image_size,
                "patch_size": 8,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                **tower,
                "num_attention_heads": 2,
            },
            projection_dim=24,
        )
    )
    square = {"height": image_size, "width": image_size}
    processor = CLIPProcessor(
        image_processor=clip_image_processor(size={"shortest_edge": image_size}, crop_size=square),
        tokenizer=tokenizer,
    )
    if fit_pairs is not None:
        fit_tiny_clip(clip, processor, *fit_pairs, steps=fit_steps, seed=seed)
    clip.save_pretrained(folder)
    processor.save_pretrained(folder)


def save_tiny_siglip(out_dir: str | Path, *, version: int = 1, seed: int = 0, image_size: int = 32) -> Path:
    """Write a tiny random SigLIP (``version=1``) or SigLIP 2 (``2``, NaFlex) dual encoder.

    Its tokenizer is a byte-level BPE (no sentencepiece model is needed offline); the folder loads
    with ``AutoModel`` and ``AutoProcessor`` like a downloaded one, for the cross-modal teacher
    role. SigLIP 2's processor cuts images into up to 256 patches of 16 pixels, its default.
    """
    import transformers

    from unimm.tiny.models import train_tiny_tokenizer

    if version not in (1, 2):
        raise ValueError(f"version must be 1 or 2, got {version}")
    quiet_transformers()
    tokenizer = train_tiny_tokenizer([" ".join(_WORDS)], 400)
    tokenizer.model_max_length = 16
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    torch.manual_seed(seed)
    if version == 1:
        vision = {**tower, "image_size": image_size, "patch_size": 8}
        model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
        image_processor = transformers.SiglipImageProcessorPil(
            size={"height": image_size, "width": image_size}
        )
        processor = transformers.SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    else:
        vision = {**tower, "num_patches": 256, "patch_size": 16}
        model = transformers.Siglip2Model(transformers.Siglip2Config(text_config=text, vision_config=vision))
        image_processor = transformers.Siglip2ImageProcessorPil(patch_size=16, max_num_patches=256)
        processor = transformers.Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
