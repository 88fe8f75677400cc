"""``unimm prepare``: records (JSONL, LLaVA JSON, MMC4, CSV) → WebDataset shards with teacher features.

    unimm prepare data.jsonl --out shards --image-size 336 --workers 2 \
        --teacher-image-expert models/dinov2-base --teacher-text-expert models/bge-base-en \
        --teacher-clip models/clip-vit-large-patch14

The pipeline is :func:`unimm.data.prepare.write_shards`.
"""

from __future__ import annotations

from unimm.config import PrepareConfig
from unimm.data.prepare import PrepareResult, write_shards


def run(cfg: PrepareConfig, *, progress: bool = True) -> PrepareResult:
    """Prepare shards as configured (see :mod:`unimm.data.prepare`)."""
    return write_shards(cfg, progress=progress)
