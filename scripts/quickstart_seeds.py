"""Measure the spread of the quickstart over seeds and CPU instruction sets: where the thresholds of
``tests/test_quickstart.py::test_quickstart_shows_learning`` and the README's CI bands come from.

    python scripts/quickstart_seeds.py --seeds 0-9 --out quickstart-seeds.json [--sizes readme]
    python scripts/quickstart_seeds.py --seeds 0-9 --sizes readme --isa avx2,avx512,default \\
        --out quickstart-bands.json

Runs ``unimm.pipelines.quickstart.run`` once per seed with the test's sizes (1000 records, 200
evaluation records, 1200 steps; ``--sizes readme``: the README's 300 evaluation records and 1500
steps), and prints per figure the minimum, mean ± standard deviation and maximum over the runs as
Markdown (docs/benchmarks.md keeps the tables with the command and the environment).

``--isa`` runs every seed once per instruction set that torch's CPU kernels may use, forced with
``ATEN_CPU_CAPABILITY`` in a fresh process (torch reads it once, at its first operation): the
same code and data on another CPU kind. It then also prints the README's table of CI bands
(``scripts/ci_checks.py quickstart-summary`` reads it): per summary figure, the mean ± 4 standard
deviations of all runs (seeds × instruction sets), clipped to the figure's possible range.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# The test's sizes (tests/test_quickstart.py; change both together) and the README's (the defaults).
SIZES = {
    "test": {"records": 1000, "eval_records": 200, "steps": 1200},
    "readme": {"records": 1000, "eval_records": 300, "steps": 1500},
}
BAND_STDS = 4.0
"""Half-width of a CI band in standard deviations: for a normal spread, one figure of one run falls
outside by chance with probability 6e-5 (about 1e-3 for the ten figures together)."""
# The summary's figures (their names in the README's band table) and the range each can take.
SUMMARY_FIGURES = {
    "loss_gen first": (0.0, None),
    "loss_gen last": (0.0, None),
    "loss_disc first": (0.0, None),
    "loss_disc last": (0.0, None),
    "caption exact": (0.0, 1.0),
    "caption words": (0.0, 1.0),
    "QA exact match": (0.0, 1.0),
    "two-choice accuracy": (0.0, 1.0),
    "text→image R@1": (0.0, 1.0),
    "target–learned correlation": (-1.0, 1.0),
}


def summary_figures(s: dict) -> dict[str, float]:
    """The figures the quickstart's summary prints (the ones CI checks against bands), from
    ``summary.json``."""
    (gen_first, gen_last), (disc_first, disc_last) = s["losses"]["loss_gen"], s["losses"]["loss_disc"]
    return {
        "loss_gen first": gen_first,
        "loss_gen last": gen_last,
        "loss_disc first": disc_first,
        "loss_disc last": disc_last,
        "caption exact": s["caption_exact_match"],
        "caption words": s["caption_word_accuracy"],
        "QA exact match": s["qa_exact_match"],
        "two-choice accuracy": s["two_choice_accuracy"],
        "text→image R@1": s["text_to_image_r1"],
        "target–learned correlation": s["target_learned_correlation"],
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


def run_one(seed: int, sizes: str) -> dict:
    """One quickstart in a temporary folder: the test's figures and the summary's."""
    import torch

    from unimm.pipelines.quickstart import run

    with tempfile.TemporaryDirectory() as tmp:
        summary = run(Path(tmp) / "qs", **SIZES[sizes], seed=seed, progress=False)
        scores = json.loads((Path(tmp) / "qs" / "eval.json").read_text())
    return {
        "seed": seed,
        "isa": torch.backends.cpu.get_cpu_capability(),
        "figures": figures(summary, scores),
        "summary": summary_figures(summary),
    }


def run_isolated(seed: int, sizes: str, isa: str | None) -> dict:
    """:func:`run_one` in a fresh interpreter, with torch's CPU kernels forced to ``isa``."""
    env = dict(os.environ)
    if isa is not None:
        env["ATEN_CPU_CAPABILITY"] = isa
    done = subprocess.run(
        [sys.executable, __file__, "--one", str(seed), "--sizes", sizes],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread_table(title: str, rows: list[dict], key: str) -> str:
    lines = [f"| {title} | min | mean ± std | max |", "|---|---|---|---|"]
    for name in rows[0][key]:
        values = [r[key][name] for r in rows]
        mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {name} | {min(values):.3f} | {mean:.3f} ± {std:.3f} | {max(values):.3f} |")
    return "\n".join(lines)


def band_table(rows: list[dict]) -> str:
    """The README's table of CI bands (the format ``scripts/ci_checks.py`` parses)."""
    lines = ["| figure | CI accepts | measured (min–max) |", "|---|---|---|"]
    for name, (low, high) in SUMMARY_FIGURES.items():
        values = [r["summary"][name] for r in rows]
        mean, std = statistics.mean(values), statistics.stdev(values)
        lo, hi = mean - BAND_STDS * std, mean + BAND_STDS * std
        lo = max(lo, low) if low is not None else lo
        hi = min(hi, high) if high is not None else hi
        lines.append(f"| {name} | {lo:.3f} – {hi:.3f} | {min(values):.3f} – {max(values):.3f} |")
    return "\n".join(lines)


def parse_seeds(text: str) -> list[int]:
    if "-" in text:
        first, last = (int(x) for x in text.split("-"))
        return list(range(first, last + 1))
    return [int(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0-9", help="a range A-B or a comma list")
    parser.add_argument("--out", type=Path, default=Path("quickstart-seeds.json"))
    parser.add_argument("--sizes", choices=sorted(SIZES), default="test", help="the test's or README's run")
    parser.add_argument("--isa", help="comma list of ATEN_CPU_CAPABILITY values (default, avx2, avx512)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # one seed, printed as JSON
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.sizes)), flush=True)
        return
    from unimm.utils import environment

    rows = []
    for isa in args.isa.split(",") if args.isa else [None]:
        for seed in parse_seeds(args.seeds):
            rows.append(run_isolated(seed, args.sizes, isa) if isa else run_one(seed, args.sizes))
            print(json.dumps(rows[-1]), flush=True)
    record = {"sizes": SIZES[args.sizes], "environment": environment(), "runs": rows}
    args.out.write_text(json.dumps(record, indent=1))
    print(f"\n{spread_table(f'figure ({len(rows)} runs)', rows, 'figures')}")
    print(f"\n{spread_table(f'summary figure ({len(rows)} runs)', rows, 'summary')}")
    if args.isa:
        print(f"\n{band_table(rows)}")


if __name__ == "__main__":
    main()
