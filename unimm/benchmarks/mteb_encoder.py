"""A unimm checkpoint as an mteb model: MTEB's text tasks and MIEB's image and image–text tasks.

    import mteb
    from unimm.benchmarks.mteb_encoder import UnimmEncoder

    model = UnimmEncoder("runs/tiny/step-001500", device="cuda")
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["Flickr30kI2TRetrieval"]))

:class:`UnimmEncoder` implements mteb's encoder protocol (``encode`` over mteb's data loaders,
``similarity`` as cosine, ``mteb_model_meta``). An input row with an image and a text is one
interleaved sequence, image first (how unimm records put a picture before its caption); each
vector is the same one ``unimm embed`` gives (the view cut after the last slice, unit length),
so mteb's scores on a task equal ``unimm eval``'s on the same data (a test checks it).

Prompts: by default none, as the checkpoint was trained. ``prompts`` maps mteb's prompt keys — a
task name, a task type (``Any2AnyRetrieval``, ``Classification``…), ``query`` or ``document``, or
``TaskName-query`` — to an instruction, which is put before the input as a text slice; with
``use_task_prompts=True`` the tasks' own published prompts are used where ``prompts`` has none.
mteb is an optional dependency (``pip install "unimm[mteb]"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unimm.errors import UnimmError

try:
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise UnimmError(f"the mteb model needs mteb: pip install 'unimm[mteb]' ({exc})") from None


class UnimmEncoder(AbsEncoder):
    """mteb's view of a unimm checkpoint (see the module docstring)."""

    def __init__(
        self,
        model_name: str | Path,
        revision: str | None = None,
        *,
        device: str | None = None,
        batch_size: int = 16,
        prompts: dict[str, str] | None = None,
        use_task_prompts: bool = False,
        session=None,
        **kwargs: Any,
    ) -> None:
        from unimm.inference.session import Session

        self.session = session or Session.load(model_name, device=device or "auto")
        self.batch_size = batch_size
        self.prompts_dict = dict(prompts or {})
        self.use_task_prompts = use_task_prompts
        meta = self.session.meta
        checkpoint = Path(model_name)
        self.mteb_model_meta = ModelMeta(
            loader=None,
            name=f"unimm/{checkpoint.parent.name}-{checkpoint.name}",
            revision=revision or f"step-{meta.get('step', 0)}",
            release_date=None,
            languages=None,
            n_parameters=sum(p.numel() for p in self.session.model.parameters()),
            memory_usage_mb=None,
            max_tokens=meta["inference"]["max_length"],
            embed_dim=meta["embed_dim"],
            license=None,
            open_weights=True,
            public_training_code=None,
            public_training_data=None,
            framework=["PyTorch"],
            similarity_fn_name="cosine",
            use_instructions=bool(prompts) or use_task_prompts,
            training_datasets=None,
            modalities=["text", "image"],
        )

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs):
        """Unit embeddings ``[n, d]`` (numpy float32) of every row mteb's loader yields."""
        import numpy as np
        import torch

        instruction = self._instruction(task_metadata, prompt_type)
        # mteb's query/document split picks the checkpoint's instruction when no prompt is given
        role = "query" if prompt_type is not None and prompt_type.value == "query" else "document"
        vectors = []
        for batch in inputs:
            rows = _rows(batch)
            for start in range(0, len(rows), self.batch_size):
                samples = [
                    _sample(row, instruction, n)
                    for n, row in enumerate(rows[start : start + self.batch_size])
                ]
                vectors.append(self.session.embed_views(samples, role=role))
        if not vectors:
            return np.zeros((0, self.mteb_model_meta.embed_dim), dtype=np.float32)
        return torch.cat(vectors).numpy()

    def _instruction(self, task_metadata, prompt_type) -> str:
        if not self.prompts_dict and not self.use_task_prompts:
            return ""
        keys = [task_metadata.name, task_metadata.type]
        if prompt_type is not None:
            keys = [f"{task_metadata.name}-{prompt_type.value}", *keys, prompt_type.value]
        for key in keys:
            if key in self.prompts_dict:
                return self.prompts_dict[key]
        return self.get_instruction(task_metadata, prompt_type) if self.use_task_prompts else ""


def _rows(batch: dict) -> list[dict[str, Any]]:
    """One dict per input of an mteb batch (text-like columns joined as mteb's text collation does)."""
    size = len(next(iter(batch.values())))
    rows = [{} for _ in range(size)]
    for column in ("image", "text"):
        for row, value in zip(rows, batch.get(column) or [None] * size, strict=True):
            if value is not None and value != "":
                row[column] = value
    for row, title in zip(rows, batch.get("title") or [None] * size, strict=True):
        if title and "text" in row:
            row["text"] = f"{title} {row['text']}"
    return rows


def _pil(image: Any):
    """A PIL image from what mteb hands over: a PIL image, or a ``[C, H, W]`` tensor."""
    from PIL import Image

    from unimm.data.images import to_rgb

    if hasattr(image, "mode"):
        return to_rgb(image)
    import torch

    array = image.detach().cpu()
    if array.dtype.is_floating_point:
        array = (array.clamp(0, 1) * 255).round()
    array = array.to(dtype=torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).convert("RGB")


def _sample(row: dict[str, Any], instruction: str, n: int):
    from unimm.data.samples import Sample, Slice

    slices = []
    image = row.get("image")
    if image is not None:
        slices.extend(Slice.of_image(_pil(im)) for im in (image if isinstance(image, list) else [image]))
    if "text" in row:
        slices.append(Slice.of_text(str(row["text"])))
    if not slices:
        raise UnimmError("mteb gave an input with neither text nor an image")
    # a prompt is the sample's instruction (its system text), as the checkpoint's own are
    return Sample.of_slices(slices, key=str(n), instruction=instruction or None)
