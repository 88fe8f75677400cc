"""Benchmarks during training and the best checkpoint (``train.benchmarks``, ``train.best_metric``).

Every ``train.eval_every`` steps the model being trained embeds each named benchmark's held-out
split (read once, at setup, so a wrong folder fails before the first step) exactly as a loaded
checkpoint would (:func:`unimm.inference.session.embed_last_views`), and the figures join that
step's line in ``metrics.jsonl`` as ``NAME/TASK/METRIC``. With ``train.best_metric`` the step
where that figure was best is checkpointed and ``RUN/best`` links it; ``RUN/best.json`` records
the step and value, so a resumed run keeps comparing against it, and pruning never removes it.
Replies generated and graded (VQAv2, POPE, MME, the generation half of ScienceQA-IMG and
MMBench) are left to ``unimm eval``; the likelihood halves are scored during training.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from unimm.config import TrainConfig
from unimm.errors import UnimmError

RANKING_FIGURES = ("R@1", "R@5", "R@10", "MRR")
PAIR_FIGURES = ("text", "image", "group")


def task_figures(task) -> tuple[str, ...]:
    """The figures of a benchmark task that training logs."""
    from unimm.benchmarks.base import PairTask, RankingTask

    if isinstance(task, RankingTask):
        return (*RANKING_FIGURES, *(("P@1",) if task.precision_at_1 else ()))
    if isinstance(task, PairTask):
        return (*PAIR_FIGURES, *(("pair_accuracy",) if task.pair_accuracy else ()))
    return ("accuracy", task.group_metric)


class _LiveModel:
    """What the benchmark runner needs of a session, over the model being trained (in eval mode
    and without gradients while it embeds or scores answers)."""

    def __init__(self, model, collator, autocast) -> None:
        self.model, self.collator, self.autocast = model, collator, autocast
        self.device = next(model.parameters()).device

    def instruction_for(self, role: str) -> str:
        from unimm.data.instructions import instruction_text

        c = self.collator
        return instruction_text(c.instructions, c.default_instruction, role) or ""

    def embed_views(self, samples, role: str = "document") -> torch.Tensor:
        from unimm.data.instructions import instructed
        from unimm.inference.session import embed_last_views

        c = self.collator
        samples = instructed(samples, c.instructions, c.default_instruction, role)
        with self.autocast():
            return embed_last_views(self.model, self.collator, samples)[0]


class TrainingBenchmarks:
    """The benchmarks of ``train.benchmarks``, loaded once; :meth:`evaluate` scores a model."""

    def __init__(self, cfg: TrainConfig) -> None:
        from unimm.benchmarks import get_benchmark
        from unimm.benchmarks.base import AnswerTask

        opts = cfg.train
        self.batch_size = opts.batch_size
        self.data = {}
        for name, path in opts.benchmarks.items():
            try:
                self.data[name] = get_benchmark(name).load(
                    Path(path), limit=opts.benchmark_limit, split=opts.benchmark_split
                )
            except UnimmError as exc:
                raise UnimmError(f"train.benchmarks.{name}: {exc}") from None
            self.data[name].tasks = [t for t in self.data[name].tasks if not isinstance(t, AnswerTask)]
            if not self.data[name].tasks:  # generating and grading replies takes too long mid-run
                raise UnimmError(
                    f"train.benchmarks.{name}: its replies are generated and graded, which training does "
                    f"not do; score the checkpoints with unimm eval --benchmark {name}"
                )

    def keys(self) -> list[str]:
        """The figures :meth:`evaluate` logs."""
        keys = []
        for name, data in self.data.items():
            keys += [f"{name}/{task.name}/{figure}" for task in data.tasks for figure in task_figures(task)]
            keys += [f"{name}/{average}_average/{metric}" for average, (metric, _) in data.averages.items()]
        return keys

    def evaluate(self, model, collator, autocast) -> dict[str, float]:
        """Every benchmark's headline figures for ``model`` (restored to its mode afterwards)."""
        from unimm.benchmarks.run import ItemEncoder, run_benchmark

        was_training = model.training
        model.eval()
        try:
            encoder = ItemEncoder(_LiveModel(model, collator, autocast), self.batch_size)
            out = {}
            for name, data in self.data.items():
                metrics = run_benchmark(encoder, data)["metrics"]
                for task in data.tasks:
                    for figure in task_figures(task):
                        out[f"{name}/{task.name}/{figure}"] = float(metrics[task.name][figure])
                for average, (metric, _) in data.averages.items():
                    out[f"{name}/{average}_average/{metric}"] = metrics["averages"][average][metric]
            return out
        finally:
            model.train(was_training)


class BestCheckpoint:
    """The step at which ``metric`` was best so far, persisted in ``RUN/best.json`` with a
    ``RUN/best`` link to its checkpoint."""

    def __init__(self, run_dir: Path, metric: str, mode: str, resumed_at: int = 0) -> None:
        self.run_dir, self.metric, self.mode = run_dir, metric, mode
        self.step: int | None = None
        self.value: float | None = None
        record = _read_record(run_dir / "best.json")
        if record and record.get("metric") == metric and record.get("step", math.inf) <= resumed_at:
            self.step, self.value = int(record["step"]), float(record["value"])

    def improves(self, metrics: dict[str, Any]) -> bool:
        """Whether this step's ``metric`` beats the best so far (strictly)."""
        value = metrics.get(self.metric)
        if not isinstance(value, float) or math.isnan(value):
            return False
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value

    def record(self, step: int, metrics: dict[str, Any]) -> None:
        """Make ``step`` (already checkpointed) the best: ``best.json`` then the ``best`` link."""
        from unimm.utils import atomic_write_json

        self.step, self.value = step, float(metrics[self.metric])
        atomic_write_json(
            self.run_dir / "best.json",
            {"metric": self.metric, "mode": self.mode, "step": step, "value": self.value},
        )
        link, tmp = self.run_dir / "best", self.run_dir / ".best.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(f"step-{step:06d}", tmp)
        os.replace(tmp, link)  # atomic: the link always names a whole checkpoint

    def folder(self) -> Path | None:
        return None if self.step is None else self.run_dir / f"step-{self.step:06d}"


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UnimmError(f"{path}: unreadable ({exc}); delete it to start choosing the best anew") from None
    return record if isinstance(record, dict) else None


def check_best_metric(metric: str, available: list[str]) -> None:
    """Refuse a ``train.best_metric`` that no evaluation logs."""
    if metric and metric not in available:
        raise UnimmError(
            f"train.best_metric {metric!r}: not a logged figure; the evaluations log "
            f"{', '.join(available) or 'nothing (set data.eval or train.benchmarks)'}"
        )
