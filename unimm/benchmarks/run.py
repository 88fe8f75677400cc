"""Scoring a loaded benchmark with a checkpoint: embed each distinct input once, rank, score.

The metrics are the pure functions of :mod:`unimm.inference.metrics`; what is kept per query
(the relevant ids, the rank of the first relevant one, the top candidates with their scores) is
enough to recompute every figure, at any cut-off up to ``keep``, without the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from unimm.benchmarks.base import (
    AnswerTask,
    BenchmarkData,
    ChoiceTask,
    Item,
    PairTask,
    RankingTask,
    sample_of,
)
from unimm.benchmarks.scoring import with_breakdowns
from unimm.errors import UnimmError
from unimm.utils import text_table

KEEP = 10
"""Top candidates kept per query in the results (R@1/5/10 recomputable from them)."""


class ItemEncoder:
    """Unit embeddings of :class:`Item` s through a loaded :class:`~unimm.inference.session.Session`,
    each distinct input embedded once per evaluation (COCO's 5k images once, however many
    captions point at them); batches are formed from inputs of similar length."""

    def __init__(self, session, batch_size: int = 16, *, progress: bool = False) -> None:
        self.session = session
        self.batch_size = batch_size
        self.progress = progress
        self.cache: dict[tuple, torch.Tensor] = {}
        self.forwarded = 0
        """Inputs sent through the model so far (each distinct input counts once)."""

    def __call__(self, items: Sequence[Item], desc: str = "embed", role: str = "document") -> torch.Tensor:
        """``[len(items), d]`` unit float32 embeddings, in the order of ``items``, each under the
        ``role`` (``query`` or ``document``) instruction of the session's task."""
        from unimm.utils import progress_bar

        # keyed by the instruction text: without instructions a query and a document are one input
        text = self.session.instruction_for(role)
        todo = [p for p in dict.fromkeys(item.parts for item in items) if (text, p) not in self.cache]
        todo.sort(key=lambda parts: sum(len(v) for k, v in parts if k == "text"))
        with progress_bar(
            total=len(todo), desc=desc, unit="input", disable=not self.progress or not todo
        ) as bar:
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                vectors = self.session.embed_views(
                    [sample_of(parts, n) for n, parts in enumerate(chunk)], role=role
                )
                self.cache.update(zip([(text, p) for p in chunk], vectors, strict=True))
                self.forwarded += len(chunk)
                bar.update(len(chunk))
        if not items:
            return torch.zeros(0, 0)
        return torch.stack([self.cache[text, item.parts] for item in items])


# ---------------------------------------------------------------------------------------------
# Ranking


def _columns(task: RankingTask) -> dict[str, int]:
    index = {item.id: j for j, item in enumerate(task.gallery)}
    if len(index) != len(task.gallery):
        raise UnimmError(f"{task.name}: gallery ids repeat")
    return index


def rank_task(encoder: ItemEncoder, task: RankingTask, keep: int = KEEP, chunk: int = 512) -> dict:
    """Metrics (R@1/5/10, MRR, chance@1) and per-query records of one ranking task."""
    from unimm.inference.metrics import first_relevant_ranks, recall_scores

    index = _columns(task)
    queries = encoder(task.queries, desc=f"{task.name}: queries", role="query")
    gallery = encoder(task.gallery, desc=f"{task.name}: gallery")
    gallery_ids = [item.id for item in task.gallery]
    ranks: list[int] = []
    per_query: list[dict[str, Any]] = []
    pool_sizes: list[int] = []
    relevant_counts: list[int] = []
    for start in range(0, len(task.queries), chunk):
        stop = min(start + chunk, len(task.queries))
        if task.candidates is None:
            scores = queries[start:stop] @ gallery.T
            columns = None
        else:
            columns = [[_column(index, c, task, q) for c in task.candidates[q]] for q in range(start, stop)]
            width = max(len(c) for c in columns)
            scores = torch.full((stop - start, width), -torch.inf)
            for row, cols in enumerate(columns):
                scores[row, : len(cols)] = gallery[cols] @ queries[start + row]
        relevant = torch.zeros(scores.shape, dtype=torch.bool)
        for row, q in enumerate(range(start, stop)):
            where = index if columns is None else {gallery_ids[c]: n for n, c in enumerate(columns[row])}
            for gid in task.exclude[q] if task.exclude else ():
                if gid in where:
                    scores[row, where[gid]] = -torch.inf
            hits = [_column(where, gid, task, q) for gid in task.relevant[q]]
            relevant[row, hits] = True
            pool_sizes.append(int(torch.isfinite(scores[row]).sum()))
            relevant_counts.append(len(hits))
        if bool((relevant & ~torch.isfinite(scores)).any()):
            raise UnimmError(f"{task.name}: a relevant item is also excluded from its query's ranking")
        chunk_ranks = first_relevant_ranks(scores, relevant)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]
        for row, q in enumerate(range(start, stop)):
            finite = order[row][torch.isfinite(scores[row, order[row]])]
            cols = finite if columns is None else torch.tensor(columns[row], dtype=torch.long)[finite]
            top_scores = scores[row, finite]
            per_query.append(
                {
                    "id": task.queries[q].id,
                    "relevant": list(task.relevant[q]),
                    "rank": int(chunk_ranks[row]) + 1,
                    "ranked": [
                        [gallery_ids[c], round(float(s), 6)] for c, s in zip(cols, top_scores, strict=True)
                    ],
                }
            )
        ranks.extend(chunk_ranks.tolist())
    metrics: dict[str, Any] = recall_scores(torch.tensor(ranks, dtype=torch.long))
    metrics["chance@1"] = (
        sum(r / p for r, p in zip(relevant_counts, pool_sizes, strict=True)) / len(ranks) if ranks else None
    )
    if task.precision_at_1:
        metrics["P@1"] = metrics["R@1"]
    metrics["queries"] = len(ranks)
    metrics["gallery"] = len(task.gallery) if task.candidates is None else max(pool_sizes, default=0)
    return {"metrics": metrics, "per_query": per_query}


def _column(index: dict[str, int], gid: str, task: RankingTask, q: int) -> int:
    try:
        return index[gid]
    except KeyError:
        raise UnimmError(
            f"{task.name}: query {task.queries[q].id!r} names {gid!r}, not in its gallery"
        ) from None


# ---------------------------------------------------------------------------------------------
# Winoground-shaped pairs


def pair_task(encoder: ItemEncoder, task: PairTask) -> dict:
    """Text, image and group scores (overall and per group value) and each example's 2×2 scores."""
    from unimm.inference.metrics import winoground_scores

    captions = encoder([c for pair in task.captions for c in pair], desc=f"{task.name}: captions")
    images = encoder([i for pair in task.images for i in pair], desc=f"{task.name}: images")
    n = len(task.ids)
    similarity = torch.einsum("pcd,pid->pci", captions.view(n, 2, -1), images.view(n, 2, -1))

    def scores(rows) -> dict[str, Any]:
        out = winoground_scores(similarity[rows])
        if task.pair_accuracy:
            out["pair_accuracy"] = out[task.pair_accuracy]
        return out

    metrics: dict[str, Any] = with_breakdowns(scores, len(task.ids), task.groups)
    per_example = []
    for p, example in enumerate(task.ids):
        one = winoground_scores(similarity[p : p + 1])  # the one definition of the conditions
        per_example.append(
            {
                "id": example,
                "scores": [[round(float(x), 6) for x in row] for row in similarity[p].double()],
                "text": one["text"] == 1.0,
                "image": one["image"] == 1.0,
            }
        )
    return {"metrics": metrics, "per_query": per_example}


# ---------------------------------------------------------------------------------------------
# Multiple choice by likelihood


def choice_task(encoder: ItemEncoder, task: ChoiceTask, context: list[list] | None = None) -> dict:
    """Accuracy and pair accuracy of the likeliest option, and each question's option scores
    (``context``: per question, slices put before it)."""
    from unimm.inference.evaluate import Evaluator
    from unimm.inference.metrics import choice_scores

    prompts = [  # each image opened once
        sample_of(prompt.parts, q, context[q] if context else None) for q, prompt in enumerate(task.prompts)
    ]
    expanded = [
        prompt.replace(response=option)
        for prompt, options in zip(prompts, task.options, strict=True)
        for option in options
    ]
    autocast = getattr(encoder.session, "autocast", contextlib.nullcontext)  # a live training model's
    with autocast():
        logprobs = Evaluator(encoder.session, encoder.batch_size).answer_logprobs(expanded).tolist()
    encoder.forwarded += len(expanded)
    per_question, correct, start = [], [], 0
    for q, options in enumerate(task.options):
        scores = logprobs[start : start + len(options)]
        start += len(options)
        chosen = max(range(len(options)), key=scores.__getitem__)  # the first of equal scores
        correct.append(chosen == task.answers[q])
        per_question.append(
            {
                "id": task.ids[q],
                "group": task.groups[q],
                "options": options,
                "logprobs": [round(x, 6) for x in scores],
                "answer": task.answers[q],
                "chosen": chosen,
                "correct": correct[-1],
            }
        )

    def figures(rows: list[int]) -> dict[str, Any]:
        out: dict[str, Any] = choice_scores([correct[q] for q in rows], [task.groups[q] for q in rows])
        out[task.group_metric] = out.pop("group_accuracy")
        out[task.group_count] = out.pop("groups")
        out["chance"] = sum(1 / len(task.options[q]) for q in rows) / len(rows)
        return out

    metrics = with_breakdowns(figures, len(correct), task.breakdowns)
    return {"metrics": metrics, "per_query": per_question}


def run_benchmark(
    encoder: ItemEncoder,
    data: BenchmarkData,
    keep: int = KEEP,
    context: dict[str, list] | None = None,
    judge=None,
) -> dict:
    """Every task of ``data`` and its averages and totals: ``{"metrics": {task: …, "averages": …,
    "totals": …}, "per_query": {task: […]}}``. ``context``: per answer task, each question's
    retrieved slices (retrieval-augmented evaluation); ``judge``: a judged benchmark's judge."""
    metrics: dict[str, Any] = {}
    per_query: dict[str, Any] = {}
    from unimm.benchmarks.answering import answer_task

    for task in data.tasks:
        if isinstance(task, RankingTask):
            out = rank_task(encoder, task, keep)
        elif isinstance(task, PairTask):
            out = pair_task(encoder, task)
        elif isinstance(task, AnswerTask):
            out = answer_task(encoder, task, context.get(task.name) if context else None, judge)
        else:
            out = choice_task(encoder, task, context.get(task.name) if context else None)
        metrics[task.name] = out["metrics"]
        per_query[task.name] = out["per_query"]
    for field, summaries, combine in (
        ("averages", data.averages, lambda values: sum(values) / len(values)),
        ("totals", data.totals, sum),
    ):
        scored = {n: (k, [t for t in ts if k in metrics[t]]) for n, (k, ts) in summaries.items()}
        if any(tasks for _, tasks in scored.values()):
            metrics[field] = {
                name: {key: combine([metrics[t][key] for t in tasks]), "tasks": len(tasks)}
                for name, (key, tasks) in scored.items()
                if tasks
            }
    return {"metrics": metrics, "per_query": per_query}


# ---------------------------------------------------------------------------------------------
# Reporting

_COLUMNS = (
    "R@1", "R@5", "R@10", "MRR", "chance@1", "text", "image", "group", "accuracy", "pair_accuracy", "P@1",
    "precision", "recall", "F1", "yes_ratio", "acc+", "circular_accuracy", "score", "relative_score",
)  # fmt: skip
_COUNTS = ("queries", "pairs", "questions", "tasks")


def _headline(metrics: dict) -> dict[str, Any]:
    """The printable figures of one task's metrics (nested breakdowns left to the JSON)."""
    row: dict[str, Any] = {k: f"{metrics[k]:.3f}" for k in _COLUMNS if isinstance(metrics.get(k), float)}
    row["n"] = next((metrics[k] for k in _COUNTS if k in metrics), None)
    return row


def _tasks(results: dict) -> dict[str, dict]:
    """Task name → its metrics, the averages (MMEB's meta-tasks) last as ``average: NAME``."""
    metrics = dict(results.get("metrics", {}))
    averages = metrics.pop("averages", {})
    totals = metrics.pop("totals", {})
    out = {name: m for name, m in metrics.items() if isinstance(m, dict)}
    out.update({f"average: {name}": m for name, m in averages.items()})
    out.update({f"total: {name}": m for name, m in totals.items()})
    return out


def format_results(results: dict) -> str:
    """One line per task with its headline figures."""
    rows = [{"task": name, **_headline(m)} for name, m in _tasks(results).items()]
    return text_table(rows, ["task", *_COLUMNS, "n"], right=(*_COLUMNS, "n"))


def format_comparison(a: dict, b: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """Two results side by side: every headline figure of A and B and the change B − A."""
    rows = []
    tasks_a, tasks_b = _tasks(a), _tasks(b)
    for task in dict.fromkeys([*tasks_a, *tasks_b]):
        ma, mb = tasks_a.get(task, {}), tasks_b.get(task, {})
        for key in _COLUMNS:
            va, vb = ma.get(key), mb.get(key)
            if not isinstance(va, float) and not isinstance(vb, float):
                continue
            rows.append(
                {
                    "task": task,
                    "metric": key,
                    names[0]: _fmt(va),
                    names[1]: _fmt(vb),
                    "change": f"{vb - va:+.3f}" if isinstance(va, float) and isinstance(vb, float) else None,
                }
            )
    return text_table(rows, ["task", "metric", *names, "change"], right=(*names, "change"))


def _fmt(value: Any) -> str | None:
    return f"{value:.3f}" if isinstance(value, float) else None
