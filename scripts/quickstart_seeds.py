"""Measure the spread of the quickstart over seeds and CPU code paths: where the thresholds of
``tests/test_quickstart.py::test_quickstart_shows_learning`` and the README's CI bands come from.

    python scripts/quickstart_seeds.py --seeds 0-9 --out quickstart-seeds.json [--sizes readme]
    python scripts/quickstart_seeds.py --seeds 0 --sizes readme --cpu grid --out quickstart-cpus.json
    python scripts/quickstart_seeds.py --seeds 1-9 --sizes readme --cpu avx2,default --out cpus-seeds.json
    python scripts/quickstart_seeds.py --tables quickstart-cpus.json cpus-seeds.json

Runs ``unimm.pipelines.quickstart.run`` once per seed with the test's sizes (1000 records, 200
evaluation records, 1200 steps; ``--sizes readme``: the README's 300 evaluation records and 1500
steps), and prints per figure the minimum, mean ± standard deviation and maximum over the runs as
Markdown (docs/benchmarks.md keeps the tables with the command and the environment).

``--cpu`` runs every seed once per CPU setting, each in a fresh process (the libraries read their
switches once): the same code and data on another CPU kind, forced on this one. A setting is
``native`` (no switch), ``avx2``, ``avx512`` or ``default`` (every library capped at that level,
``default`` being SSE), ``grid`` (torch's ATen kernels at default, AVX2 and AVX-512 × oneDNN's at
SSE4.1, AVX2 and native, plus MKL's conditional reproducibility modes), or ``KEY=VALUE+KEY=VALUE``.
With ``--cpu`` it also prints the README's table of CI bands (``scripts/ci_checks.py
quickstart-summary`` reads it): per summary figure, the README seed's mean over the CPU settings
± 4 standard deviations (the larger of its own across the settings and the within-seed one pooled
over all seeds), clipped to the figure's possible range.
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

sys.path.insert(0, str(Path(__file__).parent))
from ci_checks import SUMMARY_FIGURES, split_figures

# The test's sizes (tests/test_quickstart.py; change both together) and the README's (the defaults).
SIZES = {
    "test": {"records": 1000, "eval_records": 200, "steps": 1200},
    "readme": {"records": 1000, "eval_records": 300, "steps": 1500},
}
# Each library's switch, per instruction-set level (MKL's has no visible effect on AMD CPUs).
LEVELS = {
    "avx512": {
        "ATEN_CPU_CAPABILITY": "avx512",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
    },
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "default": {
        "ATEN_CPU_CAPABILITY": "default",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
    },
}
SWITCHES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")
GRID = [
    f"ATEN_CPU_CAPABILITY={aten}" + (f"+ONEDNN_MAX_CPU_ISA={onednn}" if onednn else "")
    for aten in ("default", "avx2", "avx512")
    for onednn in ("SSE41", "AVX2", None)
] + [
    f"{cbwr}+ATEN_CPU_CAPABILITY=avx2+ONEDNN_MAX_CPU_ISA=AVX2"
    for cbwr in ("MKL_CBWR=COMPATIBLE", "MKL_CBWR=AVX2")
]
README_SEED = 0
BAND_STDS = 4.0
"""Half-width of a CI band in standard deviations: for a normal spread, one figure of one run falls
outside by chance with probability 6e-5 (about 1e-3 for the ten figures together)."""


def figure_range(name: str) -> tuple[float | None, float | None]:
    """The values a summary figure can take (a CI band is clipped to them)."""
    if name.startswith("loss"):
        return 0.0, None
    return (-1.0, 1.0) if "correlation" in name else (0.0, 1.0)


def summary_figures(summary_txt: str) -> dict[str, float]:
    """The figures of a printed summary (the ones CI checks against bands), read as CI reads them."""
    found: dict[str, float] = {}
    for line in summary_txt.splitlines():
        found |= split_figures(line)[1]
    return found


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
        printed = (Path(tmp) / "qs" / "summary.txt").read_text()
    return {
        "seed": seed,
        "isa": torch.backends.cpu.get_cpu_capability(),
        "figures": figures(summary, scores),
        "summary": summary_figures(printed),
    }


def cpu_switches(setting: str) -> dict[str, str]:
    """The environment variables of one ``--cpu`` setting."""
    if setting == "native":
        return {}
    if setting in LEVELS:
        return dict(LEVELS[setting])
    pairs = [part.split("=", 1) for part in setting.split("+")]
    if any(len(pair) != 2 or pair[0] not in SWITCHES for pair in pairs):
        raise SystemExit(
            f"--cpu {setting!r}: expected native, {', '.join(LEVELS)}, grid or KEY=VALUE+... of {SWITCHES}"
        )
    return dict(pairs)


def run_isolated(seed: int, sizes: str, setting: str) -> dict:
    """:func:`run_one` in a fresh interpreter with only the switches of ``setting`` set."""
    env = {k: v for k, v in os.environ.items() if k not in SWITCHES} | cpu_switches(setting)
    done = subprocess.run(
        [sys.executable, __file__, "--one", str(seed), "--sizes", sizes],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return {"cpu": setting} | json.loads(done.stdout.strip().splitlines()[-1])


def spread_table(title: str, rows: list[dict], key: str) -> str:
    lines = [f"| {title} | min | mean ± std | max |", "|---|---|---|---|"]
    for name in rows[0][key]:
        values = [r[key][name] for r in rows]
        mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {name} | {min(values):.3f} | {mean:.3f} ± {std:.3f} | {max(values):.3f} |")
    return "\n".join(lines)


def _clip(value: float, bound: float | None, pick) -> float:
    return value if bound is None else pick(value, bound)


def band_table(rows: list[dict]) -> str:
    """The README's table of CI bands (the format ``scripts/ci_checks.py`` parses): around the
    README seed's mean across CPU settings, ``BAND_STDS`` times the larger of two spreads: the README
    seed's own across the settings, and the spread across settings within a seed, pooled over all
    seeds (ten seeds estimate it better than one, and some seeds part more)."""
    readme = [r for r in rows if r["seed"] == README_SEED]
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "| figure | CI accepts | measured (min–max) | std | pooled std |",
        "|---|---|---|---|---|",
    ]
    for name in (n for names in SUMMARY_FIGURES.values() for n in names):
        low, high = figure_range(name)
        values = [r["summary"][name] for r in readme]
        mean, std = statistics.mean(values), statistics.stdev(values)
        squares, free = 0.0, 0
        for seed in seeds:
            group = [r["summary"][name] for r in rows if r["seed"] == seed]
            centre = statistics.mean(group)
            squares += sum((v - centre) ** 2 for v in group)
            free += len(group) - 1
        pooled = (squares / free) ** 0.5
        lo = _clip(mean - BAND_STDS * max(std, pooled), low, max)
        hi = _clip(mean + BAND_STDS * max(std, pooled), high, min)
        measured = f"{min(values):.3f} – {max(values):.3f}"
        lines.append(f"| {name} | {lo:.3f} – {hi:.3f} | {measured} | {std:.3f} | {pooled:.3f} |")
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
    parser.add_argument(
        "--cpu", help="comma list of CPU settings: native, avx2, avx512, default, grid, K=V+K=V"
    )
    parser.add_argument("--tables", type=Path, nargs="+", help="print the tables of saved --out files")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # one seed, printed as JSON
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.sizes)), flush=True)
        return
    if args.tables:
        print_tables([run for path in args.tables for run in json.loads(path.read_text())["runs"]])
        return
    from unimm.utils import environment

    settings = [
        one for part in (args.cpu or "").split(",") if part for one in (GRID if part == "grid" else [part])
    ]
    for setting in settings:
        cpu_switches(setting)  # a typo fails before an hour of runs
    rows = []
    for seed in parse_seeds(args.seeds):
        for setting in settings or [None]:
            rows.append(run_isolated(seed, args.sizes, setting) if setting else run_one(seed, args.sizes))
            print(json.dumps(rows[-1]), flush=True)
    record = {"sizes": SIZES[args.sizes], "environment": environment(), "runs": rows}
    args.out.write_text(json.dumps(record, indent=1))
    print_tables(rows)


def print_tables(rows: list[dict]) -> None:
    print(f"\n{spread_table(f'figure ({len(rows)} runs)', rows, 'figures')}")
    print(f"\n{spread_table(f'summary figure ({len(rows)} runs)', rows, 'summary')}")
    if any("cpu" in r for r in rows) and any(r["seed"] == README_SEED for r in rows):
        print(f"\n{band_table(rows)}")


if __name__ == "__main__":
    main()
