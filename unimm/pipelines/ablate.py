"""``unimm eval ablate``: the paper's ablation (its Table 4) at small scale, on your data.

    unimm eval ablate --recipe tiny-cpu --train shards --eval eval.jsonl --steps 1500 \
        --seeds 0,1,2 --out ablation

Trains every variant on the same data with the same seeds and step budget (``OUT/VARIANT/seed-N``),
evaluates each run with ``unimm eval`` and writes ``ablation.json``, ``ablation.md`` (the table:
means over seeds, ± the sample standard deviation when there are several), ``ablation.png``
(bars) and ``loss.png`` (the first seed's loss curves). A run whose ``eval.json`` exists is not
trained again, so an interrupted ablation resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

# name -> (overrides, what it removes); the switches are docs/method.md, "Ablation switches".
VARIANTS: dict[str, tuple[list[str], str]] = {
    "joint": ([], "L_g + α·L_d, triple kernel + GAK, average pooling (the method)"),
    "generative-only": (["train.alpha=0"], "L_g only"),
    "discriminative-only": (["train.gen_weight=0"], "L_d only"),
    "w/o GAK": (["align.teacher=mean"], "mean of slice similarities instead of the GAK"),
    "w/o triple kernel": (["align.teacher=clip"], "CLIP features only"),
    "w/o avg pooling": (["model.pooling=last"], "last token after an image slice too"),
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
    variants: list[str] = dataclasses.field(default_factory=lambda: list(VARIANTS))
    overrides: list[str] = dataclasses.field(default_factory=list)
    """``--set`` overrides applied to every variant."""

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
        return problems


def _slug(name: str) -> str:
    return name.replace("w/o ", "without-").replace(" ", "-")


def _value(results: dict, section: str, metric: str) -> float | None:
    part = results.get(section)
    value = part.get(metric) if isinstance(part, dict) else None
    return None if value is None else float(value)


def run(opts: AblateOptions, *, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate every variant; return ``{"rows": {variant: {column: value}}, ...}``."""
    import typer

    from unimm.commands.train import run as train
    from unimm.config import EvalOptions, TrainConfig, build_config
    from unimm.errors import ConfigError
    from unimm.inference.evaluate import Evaluator, evaluate, load_samples, strict_json
    from unimm.plots import ablation_bars, loss_curves
    from unimm.utils import atomic_write_bytes, atomic_write_json

    problems = opts.validate()
    if problems:
        raise ConfigError(problems)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = load_samples(opts.eval)
    runs: dict[str, list[dict[str, float | None]]] = {}
    for name in opts.variants:
        overrides, _ = VARIANTS[name]
        for seed in opts.seeds:
            run_dir = out / _slug(name) / f"seed-{seed}"
            result_path = run_dir / "eval.json"
            if result_path.is_file():
                results = json.loads(result_path.read_text(encoding="utf-8"))
                typer.echo(f"{name}, seed {seed}: evaluated before, reusing {result_path}")
            else:
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
                train(cfg, progress=progress)
                ev = Evaluator.load(run_dir / f"step-{opts.steps:06d}")
                results = evaluate(ev, samples, EvalOptions(model=str(run_dir), data=list(opts.eval)))
                atomic_write_json(result_path, strict_json(results))
            runs.setdefault(name, []).append(
                {column: _value(results, section, metric) for column, section, metric in COLUMNS}
            )
    rows = {name: _aggregate(values, statistics.fmean) for name, values in runs.items()}
    spread = (
        {name: _aggregate(values, statistics.stdev) for name, values in runs.items()}
        if len(opts.seeds) > 1
        else None
    )
    table = format_markdown(rows, spread)
    summary = {
        "steps": opts.steps,
        "seeds": opts.seeds,
        "train": opts.train,
        "eval": opts.eval,
        "rows": rows,
        "std": spread,
        "runs": runs,
    }
    summary["verdict"] = verdict(rows)
    atomic_write_json(out / "ablation.json", summary)
    atomic_write_bytes(out / "ablation.md", (table + "\n\n" + "\n".join(summary["verdict"]) + "\n").encode())
    first = opts.seeds[0]
    metrics = {name: out / _slug(name) / f"seed-{first}" / "metrics.jsonl" for name in opts.variants}
    loss_curves({k: v for k, v in metrics.items() if v.is_file()}, out / "loss.png")
    ablation_bars(
        {n: {c: v for c, v in r.items() if v is not None} for n, r in rows.items()},
        [c for c, _, _ in COLUMNS],
        out / "ablation.png",
    )
    summary["table"] = table
    return summary


def _aggregate(values: list[dict[str, float | None]], reduce) -> dict[str, float | None]:
    """Column-wise ``reduce`` over the seeds' rows (``None`` where any seed lacks the value)."""
    out: dict[str, float | None] = {}
    for column in values[0]:
        column_values = [v[column] for v in values]
        out[column] = None if any(x is None for x in column_values) else reduce(column_values)
    return out


def format_markdown(
    rows: dict[str, dict[str, float | None]], spread: dict[str, dict[str, float | None]] | None = None
) -> str:
    """The ablation as a Markdown table (rows = variants, columns = generative, then retrieval);
    with ``spread``, each cell reads ``mean ± std``."""
    columns = [c for c, _, _ in COLUMNS]
    lines = ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = []
        for c in columns:
            if row.get(c) is None:
                cells.append("–")
            elif spread is not None and spread[name].get(c) is not None:
                cells.append(f"{row[c]:.3f} ± {spread[name][c]:.3f}")
            else:
                cells.append(f"{row[c]:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
