"""Mined hard negatives vs in-batch negatives only, on the quickstart's synthetic data
(docs/benchmarks.md, "Hard negatives").

    unimm quickstart
    python scripts/hard_negatives.py unimm-quickstart /tmp/hn --seeds 0,1,2

1. Pair records from the quickstart's training data: each captioned image (``caption`` and the
   near-duplicate ``pair`` records) gives a pair, query = its caption, positive = its image.
2. The quickstart's checkpoint embeds every training image (the corpus) and ``unimm mine`` finds
   two hard negatives per query (margin 0.95); the near-duplicate pairs' other image is the kind
   of negative it should find.
3. Per seed, the tiny recipe trains 1500 steps on the quickstart's shards plus the pair shards
   (weights 3:1) twice: ``train.hard_negatives=0`` (the pair loss with in-batch negatives only)
   and ``=2`` (plus the mined ones) — the same records, the same steps; and once on the shards
   alone (the quickstart's training) for reference.
4. ``unimm eval`` on the held-out data: two-choice accuracy, Winoground-style text/image/group
   scores over near-duplicate pairs, and text→image R@1 — mean ± std over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ARMS = {"records only": None, "pairs, in-batch negatives": 0, "pairs + mined negatives": 2}


def unimm(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "unimm.cli", *args, "-q"]
        if args[0] in ("embed", "mine")
        else [sys.executable, "-m", "unimm.cli", *args],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def make_pairs(quickstart: Path, out: Path) -> tuple[Path, Path]:
    """Pair records and the corpus of training images, written beside the training data (so
    their image paths resolve against one root)."""
    train = quickstart / "train"
    rows = [json.loads(line) for line in (train / "data.jsonl").read_text().splitlines()]
    captioned = [r for r in rows if r["meta"]["kind"] in ("caption", "pair")]
    pairs, corpus = [], []
    for r in captioned:
        text = next(s["text"] for s in r["slices"] if "text" in s)
        image = next(s["image"] for s in r["slices"] if "image" in s)
        pairs.append({"id": r["id"], "query": [{"text": text}], "positive": [{"image": image}]})
        corpus.append({"id": r["id"], "slices": [{"image": image}]})
    out.mkdir(parents=True, exist_ok=True)
    pair_file, corpus_file = train / "hn-pairs.jsonl", train / "hn-corpus.jsonl"
    for path, items in ((pair_file, pairs), (corpus_file, corpus)):
        path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return pair_file, corpus_file


def mined_shards(quickstart: Path, out: Path) -> Path:
    miner = quickstart / "run" / "step-001500"
    pair_file, corpus_file = make_pairs(quickstart, out)
    if not (out / "index" / "manifest.json").is_file():
        unimm(
            "embed",
            "--model",
            str(miner),
            "--data",
            str(corpus_file),
            "--out",
            str(out / "index"),
            "--dtype",
            "float32",
            "--overwrite",
        )
    mined = quickstart / "train" / "hn-mined.jsonl"
    if not mined.is_file():
        unimm(
            "mine",
            "--model",
            str(miner),
            "--index",
            str(out / "index"),
            "--pairs",
            str(pair_file),
            "--out",
            str(mined),
            "--negatives",
            "2",
        )
    shards = out / "pair-shards"
    if not (shards / "manifest.json").is_file():
        teachers = quickstart / "teachers"
        unimm(
            "prepare",
            str(mined),
            "--out",
            str(shards),
            "--image-size",
            "64",
            "--teacher-image-expert",
            str(teachers / "image_expert"),
            "--teacher-text-expert",
            str(teachers / "text_expert"),
            "--teacher-clip",
            str(teachers / "clip"),
        )
    return shards


def train_and_eval(quickstart: Path, pair_shards: Path, out: Path, seed: int, negatives: int | None) -> dict:
    run = out / f"seed{seed}-{'none' if negatives is None else negatives}"
    data = (
        f"data.train={quickstart / 'shards'}"
        if negatives is None
        else (f"data.train=[{quickstart / 'shards'},{pair_shards}]")
    )
    if not (run / "step-001500").is_dir():
        unimm(
            "train",
            "--recipe",
            "tiny-cpu",
            "--out",
            str(run),
            "--set",
            data,
            *(
                ["--set", "data.weights=[3,1]", "--set", f"train.hard_negatives={negatives}"]
                if negatives is not None
                else []
            ),
            "--set",
            "train.max_steps=1500",
            "--set",
            "train.save_every=1500",
            "--set",
            f"train.seed={seed}",
        )
    results = run / "eval.json"
    if not results.is_file():
        unimm(
            "eval",
            "--model",
            str(run / "step-001500"),
            "--data",
            str(quickstart / "eval" / "data.jsonl"),
            "--out",
            str(results),
        )
    scores = json.loads(results.read_text())
    return {
        "two-choice": scores["two_choice"]["accuracy"],
        "wino text": scores["winoground"]["text"],
        "wino image": scores["winoground"]["image"],
        "wino group": scores["winoground"]["group"],
        "t→i R@1": scores["text_to_image"]["R@1"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("quickstart", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    pair_shards = mined_shards(args.quickstart, args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    table = {
        arm: [train_and_eval(args.quickstart, pair_shards, args.out, s, n) for s in seeds]
        for arm, n in ARMS.items()
    }
    keys = list(next(iter(table.values()))[0])
    print("| arm | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for arm, rows in table.items():
        cells = []
        for key in keys:
            values = [r[key] for r in rows]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {std:.3f}")
        print(f"| {arm} | " + " | ".join(cells) + " |")
    (args.out / "table.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
