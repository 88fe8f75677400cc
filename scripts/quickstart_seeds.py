"""Measure the spread of the reduced quickstart over seeds: where the thresholds of
``tests/test_quickstart.py::test_quickstart_shows_learning`` come from.

    python scripts/quickstart_seeds.py --seeds 0-9 --out quickstart-seeds.json [--sizes readme]

Runs ``unimm.pipelines.quickstart.run`` once per seed with the test's sizes (1000 records, 200 evaluation
records, 1200 steps; ``--sizes readme``: the README's 300 evaluation records and 1500 steps), and
prints per figure the minimum, mean ± standard deviation and maximum over the seeds as Markdown
(docs/benchmarks.md keeps the table with the command and the environment).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from unimm.pipelines.quickstart import run
from unimm.utils import environment

# The test's sizes (tests/test_quickstart.py; change both together) and the README's (the defaults).
SIZES = {
    "test": {"records": 1000, "eval_records": 200, "steps": 1200},
    "readme": {"records": 1000, "eval_records": 300, "steps": 1500},
}


def figures(s: dict, scores: dict) -> dict[str, float]:
    """The figures the test asserts on, from the summary and the run's eval.json."""
    (gen_first, gen_last), (disc_first, disc_last) = s["losses"]["loss_gen"], s["losses"]["loss_disc"]
    t2i, i2t = scores["text_to_image"], scores["image_to_text"]
    return {
        "loss_gen last/first": gen_last / gen_first,
        "loss_disc last/first": disc_last / disc_first,
        "two-choice accuracy": s["two_choice_accuracy"],
        "caption word accuracy": s["caption_word_accuracy"],
        "QA exact match": s["qa_exact_match"],
        "text→image R@1 / chance": t2i["R@1"] / t2i["chance@1"],
        "text→image R@10 / chance": t2i["R@10"] / min(1.0, 10 * t2i["chance@1"]),
        "image→text R@10 / chance": i2t["R@10"] / min(1.0, 10 * i2t["chance@1"]),
        "target–learned correlation": s["target_learned_correlation"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0-9", help="a range A-B or a comma list")
    parser.add_argument("--out", type=Path, default=Path("quickstart-seeds.json"))
    parser.add_argument("--sizes", choices=sorted(SIZES), default="test", help="the test's or README's run")
    args = parser.parse_args()
    if "-" in args.seeds:
        first, last = (int(x) for x in args.seeds.split("-"))
        seeds = list(range(first, last + 1))
    else:
        seeds = [int(x) for x in args.seeds.split(",")]
    rows = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            summary = run(Path(tmp) / "qs", **SIZES[args.sizes], seed=seed, progress=False)
            scores = json.loads((Path(tmp) / "qs" / "eval.json").read_text())
        rows.append({"seed": seed, **figures(summary, scores)})
        print(json.dumps(rows[-1]), flush=True)
    record = {"sizes": SIZES[args.sizes], "environment": environment(), "runs": rows}
    args.out.write_text(json.dumps(record, indent=1))
    print(f"\n| figure ({len(rows)} seeds) | min | mean ± std | max |\n|---|---|---|---|")
    for key in rows[0]:
        if key != "seed":
            values = [r[key] for r in rows]
            mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"| {key} | {min(values):.3f} | {mean:.3f} ± {std:.3f} | {max(values):.3f} |")


if __name__ == "__main__":
    main()
