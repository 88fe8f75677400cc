"""Helpers shared by the tests: small images, record files, training configurations."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml"

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 20), (250, 250, 250), (10, 10, 10)]


def make_image(path: Path, size=(64, 48), colour=(200, 30, 30), fmt: str | None = None, mode="RGB") -> Path:
    """Write an image with a colour and a small pattern (so that resizing is visible)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new(mode, size, colour if mode == "RGB" else (*colour, 255) if mode == "RGBA" else 128)
    if mode == "RGB":
        for x in range(0, size[0], 8):
            for y in range(0, size[1], 8):
                if (x // 8 + y // 8) % 2:
                    img.putpixel((x, y), (0, 0, 0))
    img.save(path, format=fmt)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows (dicts, or raw strings written as-is) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def config(out, shards, *overrides, resume=False):
    """The tiny-cpu recipe on ``shards``, logging every step, with ``overrides`` (``key=value``)."""
    from unimm.config import TrainConfig, build_config

    return build_config(
        TrainConfig,
        recipe=RECIPE,
        options={"out": str(out), "resume": resume or None},
        overrides=[f"data.train={shards}", "train.log_every=1", *overrides],
    )


def metrics(run_dir) -> list[dict]:
    """The lines of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
