"""Matryoshka at small scale: text→image recall at each embedding size, trained with the sizes
and without (docs/benchmarks.md, "Matryoshka").

    unimm quickstart
    python scripts/matryoshka_recall.py unimm-quickstart /tmp/mat --seeds 0,1,2

Per seed, trains the tiny recipe on the quickstart's shards for 1500 steps twice — plain, and with
``model.matryoshka=[32,16]`` (the tiny recipe's ``embed_dim`` is 64) — then embeds the held-out
captioned images' captions and images with ``Session`` and scores text→image R@1/5/10 with every
vector cut to 64, 32, 16 and 8 components and re-normalised (what ``unimm embed --dim`` stores; the
plain model's cuts, and 8 for both, are sizes they were not trained for, computed here by hand
to show what the training buys). A caption's relevant image is its own record's.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

SIZES = (64, 32, 16, 8)


def train(quickstart: Path, out: Path, seed: int, matryoshka: bool) -> Path:
    from unimm.commands.train import run
    from unimm.config import TrainConfig, build_config

    overrides = [
        f"data.train={quickstart / 'shards'}",
        "train.max_steps=1500",
        "train.save_every=1500",
        f"train.seed={seed}",
        *(["model.matryoshka=[32,16]"] if matryoshka else []),
    ]
    if not (out / "step-001500").is_dir():
        run(
            build_config(TrainConfig, recipe="tiny-cpu", options={"out": str(out)}, overrides=overrides),
            progress=False,
        )
    return out / "step-001500"


def recalls(checkpoint: Path, quickstart: Path) -> dict[int, dict[str, float]]:
    from unimm.data.adapters import open_image
    from unimm.data.samples import Sample, Slice
    from unimm.inference.metrics import first_relevant_ranks, recall_scores
    from unimm.inference.session import Session
    from unimm.model.core import truncate

    rows = [json.loads(line) for line in (quickstart / "eval" / "data.jsonl").read_text().splitlines()]
    pairs = [r for r in rows if r["meta"]["kind"] in ("caption", "pair")]
    text = [next(s["text"] for s in r["slices"] if "text" in s) for r in pairs]
    image = [next(s["image"] for s in r["slices"] if "image" in s) for r in pairs]
    session = Session.load(checkpoint, device="cpu")
    queries = session.embed_views([Sample.of_slices([Slice.of_text(t)]) for t in text])
    gallery = session.embed_views(
        [Sample.of_slices([Slice.of_image(open_image(quickstart / "eval" / p))]) for p in image]
    )
    out = {}
    for d in SIZES:
        q, g = truncate(queries, d), truncate(gallery, d)  # what unimm embed --dim stores
        relevant = torch.tensor([[t == u for u in text] for t in text])  # equal captions: equally right
        out[d] = recall_scores(first_relevant_ranks(q @ g.T, relevant))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("quickstart", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    table: dict[str, dict[int, list[dict]]] = {"plain": {}, "matryoshka [32,16]": {}}
    for seed in seeds:
        for name, nested in (("plain", False), ("matryoshka [32,16]", True)):
            checkpoint = train(
                args.quickstart, args.out / f"{'mat' if nested else 'plain'}-{seed}", seed, nested
            )
            for d, scores in recalls(checkpoint, args.quickstart).items():
                table[name].setdefault(d, []).append(scores)
    print("| training | size | R@1 | R@5 | R@10 |\n|---|---|---|---|---|")
    for name, by_size in table.items():
        for d, runs in by_size.items():
            cells = []
            for k in ("R@1", "R@5", "R@10"):
                values = [r[k] for r in runs]
                spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
                cells.append(f"{statistics.fmean(values):.3f}{spread}")
            print(f"| {name} | {d} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
