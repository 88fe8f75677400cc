"""``unimm prepare``: records (JSONL, LLaVA JSON, MMC4, CSV) → WebDataset shards with teacher features.

    unimm prepare data.jsonl --out shards --image-size 336 --workers 2 \
        --teacher-image-expert models/dinov2-base --teacher-text-expert models/bge-base-en \
        --teacher-clip models/clip-vit-large-patch14

The pipeline is :func:`unimm.data.prepare.write_shards`.
"""

from __future__ import annotations

from pathlib import Path

from unimm.config import PrepareConfig, TrainOptions, load_recipe
from unimm.data.prepare import PrepareResult, write_shards


def teachers_warning(cfg: PrepareConfig, recipe: str | Path | None) -> str | None:
    """What to say up front when shards are prepared without teachers although the recipe's
    structure-induced loss (``train.alpha > 0``, the default) will need their features."""
    if cfg.teachers.enabled:
        return None
    alpha = TrainOptions.alpha
    if recipe is not None:
        alpha = (load_recipe(recipe).get("train") or {}).get("alpha", alpha)
    if not alpha:
        return None
    where = f"the recipe's train.alpha={alpha}" if recipe is not None else f"train.alpha={alpha}, the default"
    return (
        "no teachers given (--teacher-clip, --teacher-image-expert, --teacher-text-expert): these shards "
        f"carry no teacher features, so `unimm train` with the structure-induced loss ({where}) will "
        "refuse them. Give the teachers now, or train with --set train.alpha=0 (next-token loss only)."
    )


def run(cfg: PrepareConfig, *, progress: bool = True) -> PrepareResult:
    """Prepare shards as configured (see :mod:`unimm.data.prepare`)."""
    return write_shards(cfg, progress=progress)
