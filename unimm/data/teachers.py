"""Frozen teacher encoders whose features the structure-induced loss compares slices with.

Per slice two unit vectors (docs/method.md):

- image slice: ``u`` = image-expert embedding, ``v`` = the cross-modal teacher's image embedding;
- text slice: ``u`` = text-expert embedding, ``v`` = the cross-modal teacher's text embedding.

Which models can play which role (each from a local folder, loaded with ``AutoModel``):

- cross-modal teacher (``--teacher-clip``): any dual encoder with ``get_image_features`` and
  ``get_text_features`` in one space — CLIP, SigLIP, SigLIP 2. SigLIP-family text is padded to
  the text tower's full length, as those models were trained (their pooled token is the last);
- image expert: an image encoder (DINOv2 with or without registers, a CLIP or SigLIP vision
  tower: ``pooler_output``, else the first token), or a whole dual encoder (its image half);
- text expert: a text encoder (BERT, XLM-R, BGE, E5, ...), pooled by ``teachers.text_pooling``
  (``cls``: the first token, as BGE; ``mean``: the mean over the real tokens, as E5 and GTE), or a
  whole dual encoder (its text half).

``u`` rows of both experts are zero-padded to one width, which keeps same-modality dot products
unchanged (the triple kernel never compares ``u`` across modalities). Each row is L2-normalised
in float32 and stored as float16. Teachers load from local directories only
(``local_files_only``); ``trust_remote_code`` stays off unless asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from unimm.config import TeacherOptions
from unimm.errors import UnimmError
from unimm.utils import resolve_device

MODALITY_TEXT = 0
MODALITY_IMAGE = 1
_PROBE_IMAGE = Image.new("RGB", (32, 32), (127, 127, 127))  # to learn an encoder's output width


@dataclasses.dataclass
class TeacherFeatures:
    """Features of one sample's slices: ``u`` [n, d_u], ``v`` [n, d_v] (fp16), ``modality`` [n]."""

    u: torch.Tensor | None
    v: torch.Tensor
    modality: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"v": self.v, "modality": self.modality}
        if self.u is not None:
            out["u"] = self.u
        return out


def hash_directory(path: str | Path) -> str:
    """sha256 over the relative names and bytes of every file in a model directory."""
    digest = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode())
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _check_model_dir(path: str, flag: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise UnimmError(f"{flag} {path}: not a directory; give a local model folder (nothing is downloaded)")
    if not (p / "config.json").is_file():
        raise UnimmError(
            f"{flag} {path}: no config.json; it must be a Hugging Face model folder (save_pretrained)"
        )
    return p


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_SIGLIP_TYPES = ("siglip", "siglip2")  # text trained padded to the full length, pooled at the last token


class _DualEncoder:
    """A model with ``get_image_features`` and ``get_text_features`` (CLIP, SigLIP, SigLIP 2)."""

    def __init__(self, model, processor, device: torch.device) -> None:
        self.model, self.processor, self.device = model, processor, device
        text_config = getattr(model.config, "text_config", None)
        self.text_length = getattr(text_config, "max_position_embeddings", None) or 77
        self.pad_to_length = model.config.model_type in _SIGLIP_TYPES

    def images(self, images: list[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        return _features(self.model.get_image_features(**inputs))

    def texts(self, texts: list[str]) -> torch.Tensor:
        padding = "max_length" if self.pad_to_length else True
        inputs = self.processor.tokenizer(
            texts, padding=padding, truncation=True, max_length=self.text_length, return_tensors="pt"
        ).to(self.device)
        return _features(self.model.get_text_features(**inputs))


class _ImageExpert:
    """An image encoder's pooled output (or first token), or a dual encoder's image features."""

    def __init__(self, model, image_processor, device: torch.device) -> None:
        self.model, self.image_processor, self.device = model, image_processor, device

    def images(self, images: list[Image.Image]) -> torch.Tensor:
        inputs = self.image_processor(images=images, return_tensors="pt").to(self.device)
        if hasattr(self.model, "get_image_features"):
            return _features(self.model.get_image_features(**inputs))
        out = self.model(**inputs)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]


class _TextExpert:
    """A text encoder pooled by ``cls`` or ``mean``, or a dual encoder's text features."""

    def __init__(self, model, tokenizer, device: torch.device, pooling: str, max_length: int) -> None:
        self.model, self.tokenizer, self.device, self.pooling = model, tokenizer, device, pooling
        self.max_length = min(max_length, _model_max_length(tokenizer, model))

    def texts(self, texts: list[str]) -> torch.Tensor:
        inputs = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        if hasattr(self.model, "get_text_features"):
            return _features(self.model.get_text_features(**inputs))
        hidden = self.model(**inputs).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]  # as BGE does
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


class TeacherEncoders:
    """The loaded teachers; :meth:`encode` gives the features of a batch of samples."""

    def __init__(self, options: TeacherOptions) -> None:
        from unimm.utils import quiet_transformers

        quiet_transformers()
        self.options = options
        self.device = resolve_device(options.device)
        self.info: dict[str, dict] = {}
        self.image_expert: _ImageExpert | None = None
        self.text_expert: _TextExpert | None = None
        if options.image_expert is not None:
            model, path = self._load(options.image_expert, "--teacher-image-expert")
            processor = self._load_processor(path, "--teacher-image-expert", image=True)
            self.image_expert = _ImageExpert(model, processor, self.device)
            self.info["image_expert"] = self._describe(path, model, self.image_expert.images, _PROBE_IMAGE)
        if options.text_expert is not None:
            model, path = self._load(options.text_expert, "--teacher-text-expert")
            tokenizer = self._load_processor(path, "--teacher-text-expert", image=False)
            self.text_expert = _TextExpert(
                model, tokenizer, self.device, options.text_pooling, options.text_max_length
            )
            described = self._describe(path, model, self.text_expert.texts, "a")
            self.info["text_expert"] = {**described, "pooling": options.text_pooling}
        model, path = self._load(options.clip, "--teacher-clip")
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise UnimmError(
                f"--teacher-clip {options.clip}: a {model.config.model_type!r} model is not a dual encoder "
                "(it needs image and text features in one space); give a CLIP, SigLIP or SigLIP 2 folder"
            )
        self.clip = _DualEncoder(model, self._load_processor(path, "--teacher-clip", image=None), self.device)
        self.info["clip"] = self._describe(path, model, self.clip.texts, "a")
        d_image = self.info.get("image_expert", {}).get("dim", 0)
        d_text = self.info.get("text_expert", {}).get("dim", 0)
        self.u_dim = max(d_image, d_text) if self.image_expert is not None else 0
        self.v_dim = self.info["clip"]["dim"]

    def _load(self, folder: str, flag: str):
        from transformers import AutoModel

        path = _check_model_dir(folder, flag)
        remote = self.options.trust_remote_code
        try:
            model = AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=remote)
        except Exception as exc:  # transformers raises many types for an unusable folder
            raise UnimmError(
                f"{flag} {folder}: cannot load the model ({type(exc).__name__}: {exc})"
            ) from None
        return model.to(self.device).eval().requires_grad_(False), path

    def _load_processor(self, path: Path, flag: str, *, image: bool | None):
        """The image processor (``image``), the tokenizer (not ``image``) or the whole processor."""
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

        loader = {True: AutoImageProcessor, False: AutoTokenizer, None: AutoProcessor}[image]
        what = {True: "image processor", False: "tokenizer", None: "processor"}[image]
        # transformers 5 builds a tokenizer with an empty vocabulary when its files are missing;
        # features of such a tokenizer's output would be silently meaningless.
        files = {True: _IMAGE_PROCESSOR_FILES, False: _TOKENIZER_FILES}.get(image, ())
        if files and not any((path / name).is_file() for name in files):
            raise UnimmError(
                f"{flag} {path}: no {what} files (one of {', '.join(files)}); save the {what} "
                "into the folder with save_pretrained"
            )
        try:
            return loader.from_pretrained(
                path, local_files_only=True, trust_remote_code=self.options.trust_remote_code
            )
        except Exception as exc:  # as above
            raise UnimmError(
                f"{flag} {path}: cannot load its {what} ({type(exc).__name__}: {exc}); the folder needs "
                "the files save_pretrained writes for it"
            ) from None

    @staticmethod
    def _describe(path: Path, model, encode, probe) -> dict:
        """What the manifest records of one teacher; its width is that of ``encode([probe])``."""
        with torch.inference_mode():
            dim = encode([probe]).shape[-1]
        return {
            "name": path.name,
            "model_type": model.config.model_type,
            "dim": int(dim),
            "sha256": hash_directory(path),
        }

    def manifest(self) -> dict:
        """What the shard manifest records about the teachers."""
        return {**self.info, "u_dim": self.u_dim, "v_dim": self.v_dim}

    @torch.inference_mode()
    def encode(self, samples: Sequence[Sequence[str | Image.Image]]) -> list[TeacherFeatures]:
        """Features for each sample, whose slices are texts (``str``) or RGB images.

        All slices of all samples are batched together (``teachers.batch_size`` per call).
        """
        flat = [(i, j, s) for i, sample in enumerate(samples) for j, s in enumerate(sample)]
        images = [s for _, _, s in flat if not isinstance(s, str)]
        texts = [s for _, _, s in flat if isinstance(s, str)]
        v_img = self._batched(images, self.clip.images)
        v_txt = self._batched(texts, self.clip.texts)
        experts = self.image_expert is not None and self.text_expert is not None
        u_img = self._batched(images, self.image_expert.images) if experts else None
        u_txt = self._batched(texts, self.text_expert.texts) if experts else None
        out: list[list] = [[None] * len(sample) for sample in samples]
        counters = {"img": 0, "txt": 0}
        for i, j, s in flat:
            kind = "txt" if isinstance(s, str) else "img"
            k = counters[kind]
            counters[kind] += 1
            v = (v_txt if kind == "txt" else v_img)[k]
            u = (u_txt if kind == "txt" else u_img)[k] if experts else None
            out[i][j] = (u, v, MODALITY_TEXT if kind == "txt" else MODALITY_IMAGE)
        return [self._stack(rows) for rows in out]

    def _stack(self, rows: list) -> TeacherFeatures:
        v = torch.stack([r[1] for r in rows]).to(torch.float16)
        modality = torch.tensor([r[2] for r in rows], dtype=torch.uint8)
        u = None
        if self.image_expert is not None:
            u = torch.zeros(len(rows), self.u_dim, dtype=torch.float16)
            for n, row in enumerate(rows):
                u[n, : row[0].shape[0]] = row[0].to(torch.float16)
        return TeacherFeatures(u=u, v=v, modality=modality)

    def _batched(self, items: list, fn) -> torch.Tensor | list:
        if not items:
            return []
        size = self.options.batch_size
        parts = [fn(items[k : k + size]) for k in range(0, len(items), size)]
        feats = torch.cat(parts).float().cpu()
        return torch.nn.functional.normalize(feats, dim=-1)


def _features(out) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output with ``pooler_output`` (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _model_max_length(tokenizer, model) -> int:
    limits = [
        getattr(model.config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    # BERT-style models reserve nothing beyond max_position_embeddings; RoBERTa-style reserve 2.
    offset = 2 if getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta") else 0
    return min(limits) - offset if limits else 512
