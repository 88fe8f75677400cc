"""The model core: a Hugging Face image-text-to-text model plus a trained retrieval head.

One forward pass over a collated batch (:class:`unimm.data.collate.Collator`) gives

- the generative loss: next-token cross-entropy on the labelled tokens, with logits computed
  only at those positions (a 7B model's full ``[B, T, vocab]`` logits are never materialised);
- the embeddings of the requested views: the last-layer hidden states (after the final norm,
  before the LM head) pooled at each view's cut point, mapped by the retrieval head and
  L2-normalised. Pooling ``paper``: after a text slice its last token, after an image slice the
  mean over the image's tokens (the paper's "average pooling"); ``last``: always the last token.

The causal LM makes the hidden state at a cut depend only on its prefix, so one pass embeds
every view of a sample. The model core imports no training machinery.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unimm.data.collate import IGNORE, IMAGE
from unimm.errors import UnimmError

POOLINGS = ("paper", "last")


class RetrievalHead(nn.Module):
    """Two-layer MLP from the LM's hidden size to ``embed_dim``; outputs are L2-normalised."""

    def __init__(self, hidden_size: int, embed_dim: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.embed_dim = embed_dim
        self.net = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, embed_dim)
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        out = self.net(pooled.to(self.net[0].weight.dtype))
        return nn.functional.normalize(out.float(), dim=-1)


def truncate(embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    """Matryoshka: the leading ``dim`` components of unit rows, re-normalised (the one definition,
    for the loss and for every vector served)."""
    if dim >= embeddings.shape[-1]:
        return embeddings
    return nn.functional.normalize(embeddings[..., :dim].float(), dim=-1)


def check_dimension(dim: int, trained: list[int]) -> int:
    """``dim`` when the checkpoint was trained for it (its ``inference.dimensions``).

    Raises:
        UnimmError: naming the sizes it was trained for.
    """
    from unimm.errors import UnimmError

    if dim not in trained:
        sizes = ", ".join(str(d) for d in sorted(trained, reverse=True))
        raise UnimmError(
            f"embedding size {dim}: this checkpoint was trained for {sizes} (model.matryoshka adds sizes)"
        )
    return dim


@dataclasses.dataclass
class ModelOutput:
    """What :meth:`UnimmModel.forward` returns."""

    loss_gen: torch.Tensor | None
    embeddings: torch.Tensor | None  # [V, embed_dim], unit rows
    pooled: torch.Tensor | None  # [V, hidden] before the head
    label_tokens: int


def _base(model: nn.Module) -> nn.Module:
    """The underlying transformers model (through a peft wrapper, if any)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


class UnimmModel(nn.Module):
    """A LLaVA-style model that generates and embeds.

    Args:
        mllm: an image-text-to-text model (e.g. ``LlavaForConditionalGeneration``), optionally
            wrapped by peft.
        head: the retrieval head.
        pooling: ``paper`` or ``last``.
    """

    def __init__(self, mllm: nn.Module, head: RetrievalHead, *, pooling: str = "paper") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.mllm = mllm
        self.head = head
        self.pooling = pooling

    @property
    def base(self) -> nn.Module:
        return _base(self.mllm)

    @property
    def config(self):
        return self.base.config

    @property
    def _no_split_modules(self) -> list[str]:
        # What FSDP's transformer-based wrapping shards one by one (decoder and encoder layers):
        # the base model's list, kept to classes this model has (a Llava lists CLIP text classes).
        present = {type(module).__name__ for module in self.modules()}
        return sorted(set(getattr(self.base, "_no_split_modules", None) or []) & present)

    @property
    def image_token_id(self) -> int:
        """The id the model replaces with image features (``image_token_id`` or, in older
        configs, ``image_token_index``)."""
        for name in ("image_token_id", "image_token_index"):
            value = getattr(self.config, name, None)
            if isinstance(value, int):
                return value
        raise UnimmError(f"{type(self.base).__name__}: its config names no image token (image_token_id)")

    def _image_kwargs(self, image_inputs: dict[str, torch.Tensor] | None, device) -> dict[str, Any]:
        """The collator's image inputs on ``device``; floating ones (pixels) in the model's dtype."""
        out: dict[str, Any] = {}
        for key, value in (image_inputs or {}).items():
            value = value.to(device)
            out[key] = value.to(self.base.dtype) if value.is_floating_point() else value
        return out

    def hidden_states(self, input_ids, attention_mask, image_inputs=None) -> torch.Tensor:
        """Last-layer hidden states ``[B, T, H]`` (after the final norm, before the LM head).

        ``image_inputs``: what :meth:`unimm.data.collate.Collator.image_inputs` returned.
        """
        inner = self.base.model  # e.g. LlavaModel: vision tower + projector + language model
        kwargs = self._image_kwargs(image_inputs, input_ids.device)
        return inner(
            input_ids=input_ids, attention_mask=attention_mask, **kwargs, use_cache=False
        ).last_hidden_state

    def pool(
        self, hidden: torch.Tensor, spans: list, views: list[tuple[int, int]], input_ids: torch.Tensor
    ) -> torch.Tensor:
        """Hidden state of each view ``(sample, cut slice)``: ``[V, H]`` (see module docs).

        An image view (``paper`` pooling) is the mean over *that image's* own token positions: the
        image tokens inside its span, however many the processor made of it, not the markers
        around them some families add.
        """
        input_ids = input_ids.cpu()
        image_token = self.image_token_id
        rows, last, image_views, positions = [], [], [], []
        for v, (b, cut) in enumerate(views):
            kind, start, end = spans[b][cut]
            rows.append(b)
            last.append(end - 1)
            if kind == IMAGE and self.pooling == "paper":
                own = (input_ids[b, start:end] == image_token).nonzero().flatten() + start
                image_views.append(v)
                positions.append(own if own.numel() else torch.arange(start, end))
        device = hidden.device
        b_idx = torch.tensor(rows, device=device)
        pooled = hidden[b_idx, torch.tensor(last, device=device)].float()
        if image_views:
            widest = max(len(p) for p in positions)
            # Ragged images are padded with their first position and masked out of the mean.
            index = torch.stack([torch.cat([p, p[:1].expand(widest - len(p))]) for p in positions]).to(device)
            gathered = hidden[b_idx[image_views].unsqueeze(1), index].float()
            if all(len(p) == widest for p in positions):
                means = gathered.mean(1)
            else:
                counts = torch.tensor([len(p) for p in positions], device=device)
                mask = torch.arange(widest, device=device) < counts.unsqueeze(1)
                means = (gathered * mask.unsqueeze(-1)).sum(1) / counts.unsqueeze(1)
            pooled = pooled.index_put((torch.tensor(image_views, device=device),), means)
        return pooled

    def forward(self, batch: dict, *, with_lm: bool = True, with_views: bool = True) -> ModelOutput:
        """Generative loss and view embeddings for a collated batch."""
        device = next(self.parameters()).device
        input_ids = batch["input_ids"].to(device)
        attention = batch["attention_mask"].to(device)
        hidden = self.hidden_states(input_ids, attention, batch.get("image_inputs"))
        loss_gen, label_tokens = None, 0
        if with_lm:
            labels = batch["labels"].to(device)
            target = labels[:, 1:]
            mask = target != IGNORE
            label_tokens = int(mask.sum())
            if label_tokens:
                logits = self.base.lm_head(hidden[:, :-1][mask])
                loss_gen = nn.functional.cross_entropy(logits.float(), target[mask])
            else:
                loss_gen = hidden.sum() * 0.0
        embeddings = pooled = None
        if with_views and batch.get("views"):
            # the collator's CPU ids: finding each image's positions there needs no device sync
            pooled = self.pool(hidden, batch["spans"], batch["views"], batch["input_ids"])
            embeddings = self.head(pooled)
        elif with_views and batch.get("views") is not None:  # only generative-only samples here
            embeddings = self.head(torch.zeros((0, hidden.shape[-1]), device=hidden.device))
        return ModelOutput(loss_gen, embeddings, pooled, label_tokens)

    @torch.no_grad()
    def embed(self, batch: dict) -> torch.Tensor:
        """Unit embeddings ``[V, embed_dim]`` of the batch's views (no generative loss)."""
        return self.forward(batch, with_lm=False).embeddings

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, image_inputs=None, **kwargs) -> torch.Tensor:
        """Token ids continuing ``input_ids`` (see ``transformers`` ``generate`` for ``kwargs``)."""
        kwargs.update(self._image_kwargs(image_inputs, input_ids.device))
        return self.mllm.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def load_mllm(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
):
    """Load an image-text-to-text model and its processor from a local folder (never downloads).

    ``attn_implementation``: one of :data:`ATTENTION` (default: transformers' own choice, sdpa
    where the model supports it).

    Raises:
        UnimmError: the folder is missing or not a loadable model, with what to check.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from unimm.errors import UnimmError
    from unimm.utils import quiet_transformers

    quiet_transformers()
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise UnimmError(
            f"model {path}: no config.json; give a local Hugging Face model folder (nothing is downloaded)"
        )
    try:
        attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForImageTextToText.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code, dtype=dtype, **attention
        )
        processor = AutoProcessor.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except ImportError as exc:  # a processor part that needs a package this machine lacks
        if "torchvision" in str(exc).lower():
            raise UnimmError(
                f"model {path}: its processor needs torchvision, which is not installed (Qwen-VL, "
                "LLaVA-OneVision and InternVL build a video processor with it even for images; "
                "Mistral 3's Pixtral processor is built on it); install the torchvision release "
                f"that matches torch {torch.__version__.split('+')[0]}"
            ) from None
        raise UnimmError(f"model {path}: cannot load it ({' '.join(str(exc).split())})") from None
    except Exception as exc:  # transformers raises many types for an unusable folder
        raise UnimmError(
            f"model {path}: cannot load it as an image-text-to-text model ({type(exc).__name__}: {exc})"
        ) from None
    return model, processor
