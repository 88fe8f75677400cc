"""One inference session: a checkpoint loaded the way it was saved, ready to embed and generate.

    from unimm.inference.session import Session

    session = Session.load("runs/tiny/step-000200")           # its saved dtype, device "auto"
    vectors = session.embed_views([{"key": "q", "slices": [{"kind": "text", "text": "red"}]}])

Everything the session needs comes from the checkpoint's own inference settings
(``unimm.json`` → ``inference``: system prompt, maximum length, dtype, pooling, embedding size),
never from the training recipe; older checkpoints get them patched in by
:func:`unimm.model.checkpoint.read_meta`. ``dtype="auto"`` loads the weights in the dtype they
were saved in, so a bf16 checkpoint of a 7B model is not inflated to float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from unimm.errors import UnimmError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Session:
    """A loaded checkpoint on a device, with the collator its inference settings describe.

    Attributes:
        model: the :class:`~unimm.model.core.UnimmModel`, in eval mode on ``device``.
        processor: its processor; ``tokenizer`` is the processor's tokenizer.
        meta: the checkpoint's ``unimm.json`` (with ``inference`` patched in for old checkpoints).
        collator: builds batches with the checkpoint's system prompt and maximum length.
    """

    def __init__(self, model, processor, meta: dict[str, Any], device: torch.device, *, max_length=None):
        from unimm.data.collate import Collator

        settings = meta["inference"]
        self.model = model.to(device).eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.meta = meta
        self.device = device
        self.collator = Collator.for_model(
            model,
            processor,
            max_length=max_length or settings["max_length"],
            system_prompt=settings["system_prompt"],
        )

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_length: int | None = None,
    ) -> Session:
        """Load ``checkpoint`` for inference.

        Args:
            checkpoint: a step folder written by ``unimm train``.
            device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
            dtype: ``auto`` (the dtype the weights were saved in), ``float32``, ``bfloat16`` or
                ``float16``.
            max_length: longest input in tokens; default: the checkpoint's (its training length).

        Raises:
            UnimmError: an unknown dtype, or a checkpoint that cannot be loaded (see
                :func:`~unimm.model.checkpoint.load_checkpoint`).
        """
        from unimm.model.checkpoint import load_checkpoint, read_meta
        from unimm.utils import resolve_device

        name = read_meta(checkpoint)["inference"]["dtype"] if dtype == "auto" else dtype
        if name not in DTYPES:
            raise UnimmError(f"dtype {name!r}: use auto, {', '.join(DTYPES)}")
        model, processor, meta = load_checkpoint(checkpoint, dtype=DTYPES[name])
        return cls(model, processor, meta, resolve_device(device), max_length=max_length)

    @torch.no_grad()
    def embed_views(self, samples: list[dict]) -> torch.Tensor:
        """Unit float32 embeddings ``[n, d]`` on the CPU, one per sample: the view cut after its
        last slice (how documents and queries are embedded, as in training)."""
        batch = self.collator(samples)
        batch["views"] = [(b, len(s) - 1) for b, s in enumerate(batch["spans"])]
        return self.model.embed(batch).float().cpu()

    @torch.no_grad()
    def embed_slices(self, samples: list[dict]) -> list[torch.Tensor]:
        """Per sample, the unit embeddings ``[slices, d]`` of its views cut after every slice, in
        order (the last row is :meth:`embed_views`' vector); for per-slice indexes and GAK
        re-ranking. Slices cut by the maximum length have no row."""
        batch = self.collator(samples)
        counts = [len(s) for s in batch["spans"]]
        batch["views"] = [(b, c) for b, n in enumerate(counts) for c in range(n)]
        return list(torch.split(self.model.embed(batch).float().cpu(), counts))
