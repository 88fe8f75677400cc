"""``unimm eval ablate``: the paper's ablation (its Table 4) at small scale, on your data.

    unimm eval ablate --recipe tiny-cpu --train shards --eval eval.jsonl --steps 1500 \
        --seeds 0,1,2 --benchmark coco=coco/ --benchmark pope=pope/ --out ablation

The rows are the paper's: the full method; **w/o data_g** and **w/o data_d**, which keep only
``--reduce`` (0.5) of the data of the generative or the discriminative task
(``data.task_fraction``: records tagged ``generative`` are then skipped, records serving both
keep only the other loss; tag records with a record's ``task`` or ``unimm prepare --set prepare.task=…``);
w/o GAK, w/o triple kernel and w/o average pooling. ``generative-only`` and
``discriminative-only`` (a loss removed, not data reduced; not the paper's rows) are available
with ``--variants``.

Trains every variant on the same data with the same seeds and step budget (``OUT/VARIANT/seed-N``),
evaluates each run with ``unimm eval`` on ``--eval`` records and on each ``--benchmark`` (its
headline figure: COCO's text→image R@5, VIST's R@5 from 5 captions and 4 images, Winoground's
image score, POPE's accuracy, …, as the paper's Table 4 reports them) and writes
``ablation.json``, ``ablation.md`` (the table: means over seeds, ± the sample standard
deviation when there are several, and each cell's relative change against the full method, as
the paper prints it), ``ablation.png`` (bars) and ``loss.png`` (the first seed's loss curves).
How many samples each run trained on by task is kept (``samples``), so the data-reduction rows
can be checked. A run whose ``eval.json`` exists is not trained again, so an interrupted ablation
resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

# name -> (overrides, what it removes); the switches are docs/method.md, "Ablation switches".
# {reduce} is --reduce, the fraction of a task's data the data-reduction rows keep.
VARIANTS: dict[str, tuple[list[str], str]] = {
    "joint": ([], "L_g + α·L_d, triple kernel + GAK, average pooling (the method)"),
    "w/o data_g": (["data.task_fraction.generative={reduce}"], "part of the generative task's data"),
    "w/o data_d": (["data.task_fraction.discriminative={reduce}"], "part of the discriminative task's data"),
    "w/o GAK": (["align.teacher=mean"], "mean of slice similarities instead of the GAK"),
    "w/o triple kernel": (["align.teacher=clip"], "CLIP features only"),
    "w/o avg pooling": (["model.pooling=last"], "last token after an image slice too"),
    "generative-only": (["train.alpha=0"], "L_d removed (not a paper row)"),
    "discriminative-only": (["train.gen_weight=0"], "L_g removed (not a paper row)"),
}
PAPER_ROWS = ["joint", "w/o data_g", "w/o data_d", "w/o GAK", "w/o triple kernel", "w/o avg pooling"]

# benchmark -> (task or "averages"/"totals" entry, metric): the figure a Table 4 column reports.
HEADLINES: dict[str, tuple[str, str]] = {
    "coco": ("text_to_image", "R@5"),
    "flickr30k": ("text_to_image", "R@5"),
    "vist": ("captions_images", "R@5"),
    "winoground": ("winoground", "image"),
    "mmeb": ("averages/overall", "P@1"),
    "mmvp": ("mmvp", "pair_accuracy"),
    "mmvp-vlm": ("mmvp-vlm", "pair_accuracy"),
    "vqav2": ("vqav2", "accuracy"),
    "gqa": ("gqa", "accuracy"),
    "vizwiz": ("vizwiz", "accuracy"),
    "textvqa": ("textvqa", "accuracy"),
    "pope": ("averages/accuracy", "accuracy"),
    "mme": ("totals/perception", "score"),
    "scienceqa-img": ("scienceqa-img:generation", "accuracy"),
    "mmbench": ("mmbench:generation", "circular_accuracy"),
}

# (column, section, metric): generative columns first, then retrieval.
COLUMNS = (
    ("QA EM", "qa", "exact_match"),
    ("caption words", "captioning", "word_accuracy"),
    ("2-choice", "two_choice", "accuracy"),
    ("MMVP pairs", "two_choice", "group_accuracy"),
    ("t→i R@1", "text_to_image", "R@1"),
    ("t→i R@5", "text_to_image", "R@5"),
    ("i→t R@1", "image_to_text", "R@1"),
    ("interleaved R@1", "interleaved", "R@1"),
    ("Wino group", "winoground", "group"),
)


@dataclasses.dataclass
class AblateOptions:
    """Options of ``unimm eval ablate``."""

    recipe: str = ""
    train: list[str] = dataclasses.field(default_factory=list)
    """Prepared shard directories (with teacher features) to train on."""
    eval: list[str] = dataclasses.field(default_factory=list)
    """Records or shard directories to evaluate on."""
    steps: int = 1500
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    """Training seeds; every variant is trained once per seed and the table shows the mean."""
    out: str = "ablation"
    variants: list[str] = dataclasses.field(default_factory=lambda: list(PAPER_ROWS))
    overrides: list[str] = dataclasses.field(default_factory=list)
    """``--set`` overrides applied to every variant."""
    reduce: float = 0.5
    """The fraction of a task's data the rows w/o data_g and w/o data_d keep."""
    benchmarks: dict[str, str] = dataclasses.field(default_factory=dict)
    """Benchmarks to evaluate each variant on: name → its release's folder (``unimm eval --list``)."""
    splits: dict[str, str] = dataclasses.field(default_factory=dict)
    """A benchmark's split when not ``test`` (e.g. ``{vqav2: val}``)."""

    def validate(self) -> list[str]:
        problems = []
        if not self.recipe:
            problems.append("--recipe: give the training recipe (e.g. tiny-cpu)")
        if not self.train:
            problems.append("--train: give the prepared training shards")
        if not self.eval:
            problems.append("--eval: give evaluation records or shards")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            problems.append(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
        if self.steps < 1:
            problems.append("--steps must be >= 1")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            problems.append(f"--seeds: give one or more different seeds, got {self.seeds}")
        if not 0 < self.reduce < 1:
            problems.append(f"--reduce: the fraction of a task's data to keep, in (0, 1), got {self.reduce}")
        for name in self.benchmarks:
            if name not in HEADLINES:
                problems.append(
                    f"--benchmark {name}: unknown or without a Table 4 figure (known: {', '.join(HEADLINES)})"
                )
        return problems


def _slug(name: str) -> str:
    return name.replace("w/o ", "without-").replace(" ", "-")


def _value(results: dict, section: str, metric: str) -> float | None:
    part: Any = results
    for key in section.split("/"):
        part = part.get(key) if isinstance(part, dict) else None
    value = part.get(metric) if isinstance(part, dict) else None
    return None if value is None else float(value)


def _columns(opts: AblateOptions) -> list[tuple[str, str, str]]:
    """The table's columns: the records' figures (``unimm eval``), then each benchmark's headline."""
    extra = []
    for name in opts.benchmarks:
        task, metric = HEADLINES[name]
        extra.append((f"{name} {metric}", f"benchmarks/{name}/metrics/{task}", metric))
    return [*COLUMNS, *extra]


def _evaluate(opts: AblateOptions, checkpoint: Path, samples: list) -> dict:
    """``unimm eval`` on the records and each benchmark's results, as one results dict."""
    from unimm.benchmarks import get_benchmark
    from unimm.benchmarks.run import ItemEncoder, run_benchmark
    from unimm.config import EvalOptions
    from unimm.inference.evaluate import Evaluator, evaluate

    ev = Evaluator.load(checkpoint)
    results = evaluate(ev, samples, EvalOptions(model=str(checkpoint), data=list(opts.eval)))
    results["benchmarks"] = {}
    for name, folder in opts.benchmarks.items():
        data = get_benchmark(name).load(Path(folder), split=opts.splits.get(name, "test"))
        results["benchmarks"][name] = run_benchmark(ItemEncoder(ev.session, ev.batch_size), data)
    return results


def run(opts: AblateOptions, *, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate every variant; return ``{"rows": {variant: {column: value}}, ...}``."""

    from unimm.benchmarks import get_benchmark
    from unimm.errors import ConfigError
    from unimm.inference.evaluate import load_samples
    from unimm.plots import ablation_bars, loss_curves
    from unimm.utils import atomic_write_bytes, atomic_write_json

    problems = opts.validate()
    if problems:
        raise ConfigError(problems)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = load_samples(opts.eval)
    for name, folder in opts.benchmarks.items():  # a wrong folder fails before any training
        get_benchmark(name).load(Path(folder), split=opts.splits.get(name, "test"))
    columns = _columns(opts)
    runs: dict[str, list[dict[str, float | None]]] = {}
    seen: dict[str, list[dict[str, int]]] = {}
    for name in opts.variants:
        overrides = [o.format(reduce=opts.reduce) for o in VARIANTS[name][0]]
        for seed in opts.seeds:
            results = _variant_run(opts, name, seed, overrides, samples, progress=progress)
            runs.setdefault(name, []).append(
                {column: _value(results, section, metric) for column, section, metric in columns}
            )
            seen.setdefault(name, []).append(results.get("samples", {}))
    rows = {name: _aggregate(values, statistics.fmean) for name, values in runs.items()}
    spread = (
        {name: _aggregate(values, statistics.stdev) for name, values in runs.items()}
        if len(opts.seeds) > 1
        else None
    )
    table = format_markdown(rows, spread, [c for c, _, _ in columns])
    table += "\n\n" + samples_note(seen)
    summary = {
        "steps": opts.steps,
        "seeds": opts.seeds,
        "train": opts.train,
        "eval": opts.eval,
        "benchmarks": opts.benchmarks,
        "reduce": opts.reduce,
        "rows": rows,
        "std": spread,
        "runs": runs,
        "samples": seen,
    }
    summary["verdict"] = verdict(rows)
    atomic_write_json(out / "ablation.json", summary)
    atomic_write_bytes(out / "ablation.md", (table + "\n\n" + "\n".join(summary["verdict"]) + "\n").encode())
    first = opts.seeds[0]
    metrics = {name: out / _slug(name) / f"seed-{first}" / "metrics.jsonl" for name in opts.variants}
    loss_curves({k: v for k, v in metrics.items() if v.is_file()}, out / "loss.png")
    ablation_bars(
        {n: {c: v for c, v in r.items() if v is not None} for n, r in rows.items()},
        [c for c, _, _ in columns],
        out / "ablation.png",
    )
    summary["table"] = table
    return summary


def _variant_run(
    opts: AblateOptions, name: str, seed: int, overrides: list[str], samples: list, *, progress: bool
) -> dict:
    """One variant and seed trained and evaluated (``OUT/VARIANT/seed-N/eval.json``), or its
    results of an earlier run, reused."""
    import typer

    from unimm.commands.train import run as train
    from unimm.config import TrainConfig, build_config
    from unimm.inference.evaluate import strict_json
    from unimm.utils import atomic_write_json

    run_dir = Path(opts.out) / _slug(name) / f"seed-{seed}"
    result_path = run_dir / "eval.json"
    if result_path.is_file():
        typer.echo(f"{name}, seed {seed}: evaluated before, reusing {result_path}")
        return json.loads(result_path.read_text(encoding="utf-8"))
    typer.secho(f"\n==> {name}, seed {seed}: {' '.join(overrides) or '(no change)'}", bold=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = build_config(
        TrainConfig,
        recipe=opts.recipe,
        options={"out": str(run_dir)},
        overrides=[
            *[f"data.train={d}" for d in opts.train],
            f"train.max_steps={opts.steps}",
            f"train.save_every={opts.steps}",
            f"train.seed={seed}",
            *opts.overrides,
            *overrides,
        ],
    )
    trained = train(cfg, progress=progress)
    results = _evaluate(opts, run_dir / f"step-{opts.steps:06d}", samples)
    results["samples"] = trained["history"]["samples"]
    atomic_write_json(result_path, strict_json(results))
    return results


def _aggregate(values: list[dict[str, float | None]], reduce) -> dict[str, float | None]:
    """Column-wise ``reduce`` over the seeds' rows (``None`` where any seed lacks the value)."""
    out: dict[str, float | None] = {}
    for column in values[0]:
        column_values = [v[column] for v in values]
        out[column] = None if any(x is None for x in column_values) else reduce(column_values)
    return out


def format_markdown(
    rows: dict[str, dict[str, float | None]],
    spread: dict[str, dict[str, float | None]] | None = None,
    columns: list[str] | None = None,
) -> str:
    """The ablation as a Markdown table (rows = variants, columns = generative, then retrieval,
    then the benchmarks); with ``spread``, each cell reads ``mean ± std``; every row but the full
    method's adds each cell's relative change against it, as the paper's Table 4 (``-4.2%``)."""
    columns = columns or [c for c, _, _ in COLUMNS]
    joint = rows.get("joint", {})
    lines = ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = []
        for c in columns:
            if row.get(c) is None:
                cells.append("–")
                continue
            cell = f"{row[c]:.3f}"
            if spread is not None and spread[name].get(c) is not None:
                cell += f" ± {spread[name][c]:.3f}"
            if name != "joint" and joint.get(c):
                cell += f" ({100 * (row[c] - joint[c]) / abs(joint[c]):+.1f}%)"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def samples_note(seen: dict[str, list[dict[str, int]]]) -> str:
    """What each variant trained on, summed over its seeds: samples by the losses they trained."""
    parts = []
    for name, per_seed in seen.items():
        total = {k: sum(s.get(k, 0) for s in per_seed) for k in ("both", "generative", "discriminative")}
        parts.append(
            f"{name}: {total['both']} both, {total['generative']} next-token only, "
            f"{total['discriminative']} alignment only"
        )
    return "Samples trained on (over the seeds): " + "; ".join(parts) + "."


def verdict(rows: dict[str, dict[str, float | None]]) -> list[str]:
    """Per variant: on how many columns the joint model scores at least as well (the paper's claim)."""
    if "joint" not in rows:
        return []
    joint = rows["joint"]
    lines = []
    for name, row in rows.items():
        if name == "joint":
            continue
        both = [c for c in joint if joint[c] is not None and row.get(c) is not None]
        if not both:
            continue
        wins = [c for c in both if joint[c] >= row[c]]
        losses = [c for c in both if joint[c] < row[c]]
        lines.append(
            f"- joint ≥ {name} on {len(wins)} of {len(both)} columns"
            + (f" (below on: {', '.join(losses)})" if losses else "")
        )
    return lines
