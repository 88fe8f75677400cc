"""The sentence-transformers module of an exported checkpoint (``unimm export --format
sentence-transformers``): ``SentenceTransformer(DIR, trust_remote_code=True)`` loads it.

Why a custom module: a unimm vector is the retrieval head on the MLLM's hidden state pooled at a
view's cut, over the conversation laid out by the model's own chat template (or LLaVA's plain
layout) with each image's tokens as its processor places them. sentence-transformers' own
``Transformer`` + ``Pooling`` + ``Dense`` cannot express that layout or the cut, so this module —
the smallest that can — hands the inputs to unimm's collator and model, the very code
``unimm embed`` runs. sentence-transformers ≥ 6 imports a module outside its own package only
with ``trust_remote_code=True``; the code it runs is this file of the installed ``unimm``.

Inputs, as sentence-transformers passes them: a string (text), a PIL image, ``{"image": …,
"text": …}`` (image then text, a captioned image), or a conversation: a list of messages whose
content is a string or parts ``{"type": "text", "text"}`` / ``{"type": "image", "image"}`` /
``{"type": "image_url", "image_url": {"url": "data:…"}}`` — an interleaved document, in order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from sentence_transformers.base.modules import InputModule

from unimm.data.samples import Sample, Slice
from unimm.errors import UnimmError

CONFIG_NAME = "unimm_encoder.json"


def _image(value: Any) -> Slice:
    from PIL import Image

    from unimm.data.adapters import open_image
    from unimm.data.images import to_rgb
    from unimm.inference.api import ApiError, Limits, decode_image

    if isinstance(value, Image.Image):
        return Slice.of_image(to_rgb(value))
    if isinstance(value, str) and value.startswith("data:"):
        try:
            return Slice.of_image(decode_image(value, "image", Limits()))
        except ApiError as exc:
            raise UnimmError(str(exc)) from None
    if isinstance(value, (str, Path)) and not str(value).startswith(("http://", "https://")):
        return Slice.of_image(open_image(value))
    raise UnimmError("an image must be a PIL image, a local path or a data: URL (nothing is downloaded)")


def _part(part: Any, role: str) -> Slice:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return Slice.of_text(part["text"], role)
    if kind == "image":
        return _image(part["image"]).as_role(role)
    if kind == "image_url":
        url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
        return _image(url).as_role(role)
    raise UnimmError(f"a content part must be of type text, image or image_url, got {part!r:.80}")


def to_sample(item: Any) -> Sample:
    """One sentence-transformers input as a unimm sample (see the module docstring)."""
    from PIL import Image

    if isinstance(item, str):
        slices = [Slice.of_text(item)]
    elif isinstance(item, Image.Image):
        slices = [_image(item)]
    elif isinstance(item, dict) and "role" not in item:
        unknown = set(item) - {"image", "text"}
        if unknown or not item:
            raise UnimmError(f"a dict input takes 'image' and/or 'text', got {sorted(item)}")
        slices = ([_image(item["image"])] if "image" in item else []) + (
            [Slice.of_text(item["text"])] if "text" in item else []
        )
    elif isinstance(item, (list, dict)):
        messages = [item] if isinstance(item, dict) else item
        slices = []
        for message in messages:
            role = "assistant" if message.get("role") == "assistant" else "user"
            content = message.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            slices.extend(_part(p, role) for p in parts)
    else:
        raise UnimmError(f"cannot embed a {type(item).__name__}: give text, an image or a conversation")
    return Sample.of_slices(slices)


class UnimmEncoder(InputModule):
    """A unimm checkpoint as sentence-transformers' input module, giving ``sentence_embedding``."""

    config_file_name = CONFIG_NAME
    config_keys: ClassVar[list[str]] = ["checkpoint"]

    def __init__(self, checkpoint: str, device: str = "cpu") -> None:
        super().__init__()
        from unimm.inference.session import Session

        self.checkpoint = checkpoint
        session = Session.load(checkpoint, device=device)
        self.model = session.model  # a submodule: sentence-transformers moves it with .to(device)
        self.collator = session.collator
        self.tokenizer = session.tokenizer

    @property
    def modalities(self) -> list:
        return ["text", "image", "message", ("image", "text")]

    def get_embedding_dimension(self) -> int:
        return int(self.model.head.embed_dim)

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict[str, Any]:
        # a prompt (the export's query/document instruction, or the caller's own text) is the
        # samples' instruction, as `unimm embed` and `unimm retrieve` apply it; none: none
        samples = [to_sample(item).replace(instruction=prompt or "") for item in inputs]
        batch = self.collator(samples)
        batch["views"] = [(b, len(spans) - 1) for b, spans in enumerate(batch["spans"])]
        return batch

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        features["sentence_embedding"] = self.model.embed(features).float()
        return features

    def save(self, output_path: str, *args, **kwargs) -> None:
        """Save the configuration and a copy of the checkpoint beside it."""
        from unimm.model.checkpoint import copy_checkpoint

        target = Path(output_path) / "checkpoint"
        if Path(self.checkpoint).resolve() != target.resolve():
            copy_checkpoint(Path(self.checkpoint), target)
        self.checkpoint = "checkpoint"
        self.save_config(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> UnimmEncoder:
        folder = Path(model_name_or_path) / subfolder
        if not folder.is_dir():
            raise UnimmError(f"{model_name_or_path}: an exported unimm model is a local folder")
        config = cls.load_config(str(folder), local_files_only=True)
        return cls(str(folder / config["checkpoint"]))  # sentence-transformers moves it to its device
