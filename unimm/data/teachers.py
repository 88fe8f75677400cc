"""Frozen teacher encoders whose features the structure-induced loss compares slices with.

Per slice two unit vectors (docs/method.md):

- image slice: ``u`` = image-expert embedding (e.g. DINOv2, ``pooler_output`` or the CLS
  token), ``v`` = CLIP image embedding;
- text slice: ``u`` = text-expert embedding (e.g. BGE, CLS pooling), ``v`` = CLIP text embedding.

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


class TeacherEncoders:
    """The loaded teachers; :meth:`encode` gives the features of a batch of samples."""

    def __init__(self, options: TeacherOptions) -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer, CLIPModel

        from unimm.utils import quiet_transformers

        quiet_transformers()

        self.options = options
        self.device = resolve_device(options.device)
        remote = options.trust_remote_code
        self.info: dict[str, dict] = {}
        self.image_expert = self.image_processor = self.text_expert = self.text_tokenizer = None
        try:
            if options.image_expert is not None:
                path = _check_model_dir(options.image_expert, "--teacher-image-expert")
                self.image_expert = AutoModel.from_pretrained(
                    path, local_files_only=True, trust_remote_code=remote
                )
                self.image_processor = AutoImageProcessor.from_pretrained(
                    path, local_files_only=True, trust_remote_code=remote
                )
                self.info["image_expert"] = self._describe(path, self.image_expert)
            if options.text_expert is not None:
                path = _check_model_dir(options.text_expert, "--teacher-text-expert")
                self.text_expert = AutoModel.from_pretrained(
                    path, local_files_only=True, trust_remote_code=remote
                )
                self.text_tokenizer = AutoTokenizer.from_pretrained(
                    path, local_files_only=True, trust_remote_code=remote
                )
                self.info["text_expert"] = self._describe(path, self.text_expert)
            path = _check_model_dir(options.clip, "--teacher-clip")
            self.clip = CLIPModel.from_pretrained(path, local_files_only=True)
            self.clip_processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            self.info["clip"] = self._describe(path, self.clip)
        except UnimmError:
            raise
        except (OSError, ValueError, KeyError) as exc:
            raise UnimmError(f"cannot load a teacher model: {exc}") from None
        for model in (self.image_expert, self.text_expert, self.clip):
            if model is not None:
                model.to(self.device).eval().requires_grad_(False)
        d_image = self.info.get("image_expert", {}).get("dim", 0)
        d_text = self.info.get("text_expert", {}).get("dim", 0)
        self.u_dim = max(d_image, d_text) if self.image_expert is not None else 0
        self.v_dim = self.info["clip"]["dim"]

    @staticmethod
    def _describe(path: Path, model) -> dict:
        config = model.config
        dim = getattr(config, "projection_dim", None) if config.model_type == "clip" else None
        dim = dim or getattr(config, "hidden_size", None)
        return {
            "name": path.name,
            "model_type": config.model_type,
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
        v_img = self._batched(images, self._clip_image)
        v_txt = self._batched(texts, self._clip_text)
        u_img = self._batched(images, self._expert_image) if self.image_expert is not None else None
        u_txt = self._batched(texts, self._expert_text) if self.text_expert is not None else None
        out: list[list] = [[None] * len(sample) for sample in samples]
        counters = {"img": 0, "txt": 0}
        for i, j, s in flat:
            kind = "txt" if isinstance(s, str) else "img"
            k = counters[kind]
            counters[kind] += 1
            v = (v_txt if kind == "txt" else v_img)[k]
            u = None
            if self.image_expert is not None:
                u = (u_txt if kind == "txt" else u_img)[k]
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

    def _expert_image(self, images: list[Image.Image]) -> torch.Tensor:
        inputs = self.image_processor(images=images, return_tensors="pt").to(self.device)
        out = self.image_expert(**inputs)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

    def _expert_text(self, texts: list[str]) -> torch.Tensor:
        limit = min(self.options.text_max_length, _model_max_length(self.text_tokenizer, self.text_expert))
        inputs = self.text_tokenizer(
            texts, padding=True, truncation=True, max_length=limit, return_tensors="pt"
        ).to(self.device)
        return self.text_expert(**inputs).last_hidden_state[:, 0]  # CLS pooling, as BGE does

    def _clip_image(self, images: list[Image.Image]) -> torch.Tensor:
        inputs = self.clip_processor(images=images, return_tensors="pt").to(self.device)
        return _features(self.clip.get_image_features(pixel_values=inputs["pixel_values"]))

    def _clip_text(self, texts: list[str]) -> torch.Tensor:
        limit = self.clip.config.text_config.max_position_embeddings
        inputs = self.clip_processor.tokenizer(
            texts, padding=True, truncation=True, max_length=limit, return_tensors="pt"
        ).to(self.device)
        return _features(
            self.clip.get_text_features(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            )
        )


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
