"""``unimm train``: joint generative + structure-induced training (``L = L_g + α·L_d``).

    unimm train --recipe tiny-cpu --set data.train=shards --set train.max_steps=50 --out runs/tiny
    accelerate launch --config_file "$(unimm recipes --path accelerate/ddp)" --num_processes 8 \
        -m unimm.cli train --recipe ... --out RUN

The loop, its lifecycle and exact resume are :mod:`unimm.training.trainer`.
"""

from __future__ import annotations

from typing import Any

from unimm.config import TrainConfig
from unimm.training.trainer import train


def run(cfg: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train as configured; return the final metrics (see :mod:`unimm.training.trainer`)."""
    return train(cfg, progress=progress)


def notes(history: dict[str, Any]) -> list[str]:
    """What the run's end should mention: cut slices, skipped steps, undecodable samples."""
    out = [
        f"{history[key]} {what}"
        for key, what in (
            ("dropped_slices", "slice(s) cut by model.max_length"),
            ("nonfinite_total", "step(s) skipped for a non-finite loss"),
            ("corrupt_samples", "sample(s) left out for an undecodable image"),
        )
        if history.get(key)
    ]
    seen = history.get("samples", {})
    if seen.get("generative") or seen.get("discriminative"):  # data tagged by task, or reduced
        out.append(
            f"samples trained: {seen.get('both', 0)} on both losses, {seen['generative']} on the "
            f"next-token loss only, {seen['discriminative']} on the alignment loss only"
        )
    return out
