"""Mined hard negatives vs in-batch negatives only, on the quickstart's synthetic data
(docs/benchmarks.md, "Hard negatives").

    unimm quickstart
    python scripts/hard_negatives.py unimm-quickstart /tmp/hn --seeds 0,1,2

1. Pair records from the quickstart's training data: each captioned image (``caption`` and the
   near-duplicate ``pair`` records) gives a pair, query = its caption, positive = its image.
2. The miner, as ANCE and NV-Retriever mine: the tiny recipe trained 1500 steps (seed 0) on the
   quickstart's shards plus the pairs (weights 3:1) with in-batch negatives only. It embeds every
   training image (the corpus) and ``unimm mine`` finds two hard negatives per query (margin 0.95;
   the quickstart's own checkpoint ranks its positives too low for the positive-aware filter to
   leave anything).
3. Per seed, four runs of 1500 steps: the shards alone (the quickstart's training), the shards
   plus pairs with in-batch negatives (``train.hard_negatives=0``), plus the mined pairs
   (``train.hard_negatives=2``), and plus pairs mined without the false-negative filter
   (``unimm mine --no-filter``) — the same records, the same steps.
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


def prepare(quickstart: Path, records: Path, shards: Path) -> Path:
    if not (shards / "manifest.json").is_file():
        teachers = quickstart / "teachers"
        unimm(
            "prepare",
            str(records),
            "--out",
            str(shards),
            "--image-size",
            "32",
            "--overwrite",
            "--teacher-image-expert",
            str(teachers / "image_expert"),
            "--teacher-text-expert",
            str(teachers / "text_expert"),
            "--teacher-clip",
            str(teachers / "clip"),
        )
    return shards


def train_and_eval(quickstart: Path, run: Path, seed: int, pairs: Path | None, negatives: int) -> dict:
    data = (
        f"data.train={quickstart / 'shards'}"
        if pairs is None
        else f"data.train=[{quickstart / 'shards'},{pairs}]"
    )
    if not (run / "step-001500").is_dir():
        mixed = ["--set", "data.weights=[3,1]", "--set", f"train.hard_negatives={negatives}"] if pairs else []
        unimm(
            "train",
            "--recipe",
            "tiny-cpu",
            "--out",
            str(run),
            "--set",
            data,
            *mixed,
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


def mine_with(
    quickstart: Path, out: Path, miner: Path, pair_file: Path, corpus_file: Path, *flags: str
) -> Path:
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
    mined = quickstart / "train" / f"hn-mined{''.join(flags)}.jsonl"
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
            *flags,
        )
    rows = [json.loads(line) for line in mined.read_text().splitlines()]
    found = sum(len(r["negatives"]) for r in rows)
    dropped = sum(r["meta"]["mined"]["dropped_false_negatives"] for r in rows)
    captions = {r["positive"][0]["image"]: r["query"][0]["text"] for r in rows}
    same = sum(captions.get(n[0].get("image")) == r["query"][0]["text"] for r in rows for n in r["negatives"])
    print(
        f"mined{' '.join(flags)}: {found} negatives for {len(rows)} queries, {same} of them an image of "
        f"the query's very caption (a false negative); {dropped} likely false negatives dropped"
    )
    return mined


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("quickstart", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    quickstart, out = args.quickstart, args.out
    pair_file, corpus_file = make_pairs(quickstart, out)
    plain_pairs = prepare(quickstart, pair_file, out / "pair-shards")
    seeds = [int(s) for s in args.seeds.split(",")]
    table: dict[str, list[dict]] = {"records only": [], "pairs, in-batch negatives": []}
    for seed in seeds:
        table["records only"].append(train_and_eval(quickstart, out / f"seed{seed}-records", seed, None, 0))
        table["pairs, in-batch negatives"].append(
            train_and_eval(quickstart, out / f"seed{seed}-inbatch", seed, plain_pairs, 0)
        )
    miner = out / f"seed{seeds[0]}-inbatch" / "step-001500"
    for name, flags, shards in (
        ("pairs + mined negatives", (), "mined-shards"),
        ("pairs + mined, no false-negative filter", ("--no-filter",), "mined-nofilter-shards"),
    ):
        mined = mine_with(quickstart, out, miner, pair_file, corpus_file, *flags)
        mined_pairs = prepare(quickstart, mined, out / shards)
        table[name] = [
            train_and_eval(
                quickstart, out / f"seed{seed}-{shards.removesuffix('-shards')}", seed, mined_pairs, 2
            )
            for seed in seeds
        ]
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
