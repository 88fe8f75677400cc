"""Tiny random models built offline from configs, for tests and the quickstart.

``save_tiny_teachers(out_dir)`` writes three ordinary Hugging Face model folders that
``unimm prepare --teacher-image-expert/--teacher-text-expert/--teacher-clip`` accept::

    python -c "from unimm.model.tiny import save_tiny_teachers; save_tiny_teachers('teachers')"
    unimm prepare data.jsonl --out shards --teacher-image-expert teachers/image_expert \
        --teacher-text-expert teachers/text_expert --teacher-clip teachers/clip

The widths differ on purpose (image expert 32, text expert 48, CLIP 24) so that zero padding
of ``u`` is exercised. Nothing is downloaded: tokenizers are built from a fixed vocabulary.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

_WORDS = (
    "a an the of and in on at to is are with red green blue yellow white black square circle "
    "triangle left right top bottom small big one two three four image photo picture shows "
    "there what which color shape where how many"
).split()


# With transformers' default init (std 0.02) a random encoder gives nearly the same feature for
# every input (cosine ≈ 0.998 between synthetic scenes, 0.99998 between captions), which would
# tell the student that all images (and all texts) are alike; std 1.0 and two layers spread them.
_TEACHER_INIT = 1.0
_PROJECTOR_GAIN = 0.5
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
    from unimm.utils import quiet_transformers

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


def fit_tiny_expert(
    module: torch.nn.Module,
    features,
    labels: list[str],
    *,
    steps: int = 400,
    lr: float = 1e-3,
    batch_size: int = 64,
    temperature: float = 0.1,
    seed: int = 0,
) -> list[float]:
    """Train a unimodal encoder (``module``) in place so that inputs with the same label embed alike.

    ``features(index_tensor)`` returns the module's pooled features of those items (with
    gradient). The loss is the supervised contrastive loss (Khosla et al. 2020) on the unit
    features: each item against the batch, positives = the other items with its label. Batches
    pair every drawn item with one of the same label, so positives are always present.
    Returns the loss of every step.
    """
    import random

    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    keys = sorted(groups)
    if len(keys) < 2:
        raise ValueError("fit_tiny_expert needs at least two different labels")
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr)
    module.train()
    losses = []
    for _ in range(steps):
        chosen = rng.sample(keys, min(batch_size // 2, len(keys)))
        index = [i for k in chosen for i in (rng.choice(groups[k]), rng.choice(groups[k]))]
        batch_labels = torch.arange(len(chosen)).repeat_interleave(2)  # pairs of one label
        z = torch.nn.functional.normalize(features(torch.tensor(index)), dim=-1)
        logits = (z @ z.T) / temperature
        self_mask = torch.eye(len(index), dtype=torch.bool)
        logits = logits.masked_fill(self_mask, float("-inf"))
        positive = (batch_labels[:, None] == batch_labels[None, :]) & ~self_mask
        log_prob = torch.log_softmax(logits, dim=1).masked_fill(self_mask, 0.0)
        loss = -((log_prob * positive).sum(1) / positive.sum(1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    module.eval()
    return losses


def fit_tiny_clip(
    clip,
    processor,
    images: list,
    texts: list[str],
    *,
    steps: int = 400,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> list[float]:
    """Train a (tiny) ``CLIPModel`` in place with its contrastive loss on image–caption pairs.

    On the synthetic scenes, 400 steps (about 10 s on 2 CPU cores) take held-out caption→image
    top-1 from chance to about 0.5. Returns the loss of every step.
    """
    import random

    if len(images) != len(texts) or len(texts) < 2:
        raise ValueError(
            f"fit_tiny_clip needs >= 2 pairs of equal length, got {len(images)} and {len(texts)}"
        )
    encoded = processor(
        text=texts, images=images, return_tensors="pt", padding=True, truncation=True, max_length=_CLIP_LENGTH
    )
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=lr)
    clip.train()
    losses = []
    for _ in range(steps):
        batch = torch.tensor(rng.sample(range(len(texts)), min(batch_size, len(texts))))
        out = clip(
            input_ids=encoded["input_ids"][batch],
            attention_mask=encoded["attention_mask"][batch],
            pixel_values=encoded["pixel_values"][batch],
            return_loss=True,
        )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    clip.eval()
    return losses


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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    from unimm.utils import quiet_transformers

    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor

    quiet_transformers()
    out = Path(out_dir)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([*_TEMPLATE_TEXTS, *(texts or [])], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=4096,
    )
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    tokens_per_image = (image_size // patch_size) ** 2
    config = LlavaConfig(
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
        image_token_index=image_token,
        image_seq_length=tokens_per_image,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    # The projector at the default init (std 0.02) feeds the LM near-constant image tokens, and a
    # tiny LM then learns the caption prior for hundreds of steps before it looks at the image
    # (synthetic captions: held-out loss 0.44 after 500 steps); unit-scale outputs make the
    # image visible from the start (0.16).
    with torch.no_grad():
        for layer in model.model.multi_modal_projector.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, _PROJECTOR_GAIN / layer.in_features**0.5)
                layer.bias.zero_()
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
