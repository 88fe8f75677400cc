"""Scoring an :class:`~unimm.benchmarks.base.AnswerTask`: generate each reply, grade it, sum up.

Replies are greedy (deterministic), generated in batches of prompts of similar length with each
batch's images opened only for that batch. What is kept per question (the prompt's text, the
reply, how it was read, the references, the grade) recomputes every figure without the model.
"""

from __future__ import annotations

import contextlib
from typing import Any

from unimm.benchmarks.base import AnswerTask, sample_of
from unimm.benchmarks.judged import JUDGED
from unimm.benchmarks.scoring import (
    binary_scores,
    group_all_right,
    normalize_vqa_answer,
    option_letter,
    vqa_accuracy,
    with_breakdowns,
    yes_no,
)
from unimm.errors import UnimmError


def generate_replies(encoder, task: AnswerTask, context: list[list] | None = None) -> list[str]:
    """The greedy reply to each prompt of ``task`` (its first line, stripped), in order.

    ``context``: per question, slices to put before it (retrieved documents).
    """
    from unimm.utils import progress_bar

    session = encoder.session
    order = sorted(
        range(len(task.prompts)), key=lambda q: sum(len(v) for k, v in task.prompts[q].parts if k == "text")
    )
    replies: list[str] = [""] * len(order)
    autocast = getattr(session, "autocast", contextlib.nullcontext)  # a live training model's
    with progress_bar(
        total=len(order), desc=f"{task.name}: answer", unit="question", disable=not encoder.progress
    ) as bar:
        for start in range(0, len(order), encoder.batch_size):
            chunk = order[start : start + encoder.batch_size]
            prompts = [sample_of(task.prompts[q].parts, q, context[q] if context else None) for q in chunk]
            with autocast():
                texts = session.generate(prompts, after="assistant", max_new_tokens=task.max_new_tokens)
            for q, text in zip(chunk, texts, strict=True):
                replies[q] = text.split("\n", 1)[0].strip() if task.first_line else text.strip()
            encoder.forwarded += len(chunk)
            bar.update(len(chunk))
    return replies


def grade(task: AnswerTask, q: int, reply: str) -> tuple[str | None, float | None]:
    """How question ``q``'s reply is read, and its grade (``None`` without references)."""
    refs = task.references[q]
    if task.grading == "vqa":
        read = normalize_vqa_answer(reply)
        return read, vqa_accuracy(reply, refs) if refs else None
    if task.grading == "exact":
        read = reply.strip().rstrip(".").strip().lower()
        return read, float(any(read == r.strip().rstrip(".").strip().lower() for r in refs)) if refs else None
    if task.grading in ("pope", "mme"):
        read = yes_no(reply, task.grading)
        return read, float(read == refs[0]) if refs else None
    if task.grading == "letter":
        read = option_letter(reply, task.options[q] if task.options else [])
        return read, float(read == refs[0]) if refs else None
    raise ValueError(f"{task.name}: unknown grading {task.grading!r}")


def answer_task(encoder, task: AnswerTask, context: list[list] | None = None, judge=None) -> dict:
    """The task's figures and per-question records (``context``: see :func:`generate_replies`;
    ``judge``: the :class:`~unimm.benchmarks.judged.Judge` of a judged benchmark)."""
    replies = generate_replies(encoder, task, context)
    if task.grading in JUDGED:
        from unimm.benchmarks.judged import judge_task

        if judge is None:
            raise UnimmError(f"{task.name} is scored by a judge model: give --judge URL")
        metrics, verdicts = judge_task(judge, task, replies)
        per_question = [
            {"id": task.ids[q], "reply": reply, "references": task.references[q], **verdicts[q]}
            for q, reply in enumerate(replies)
        ]
        return {"metrics": metrics, "per_query": per_question}
    graded = [grade(task, q, reply) for q, reply in enumerate(replies)]
    per_question = []
    for q, (reply, (read, score)) in enumerate(zip(replies, graded, strict=True)):
        record: dict[str, Any] = {"id": task.ids[q], "reply": reply, "read": read}
        if task.references[q]:
            record["references"] = task.references[q]
            record["score"] = score
        per_question.append(record)
    if not all(task.references):
        return {"metrics": {"questions": len(replies), "scored": False}, "per_query": per_question}
    return {
        "metrics": answer_metrics(task, [r for r, _ in graded], [s for _, s in graded]),
        "per_query": per_question,
    }


def answer_metrics(task: AnswerTask, read: list[str | None], scores: list[float]) -> dict[str, Any]:
    """The figures of one graded task: ``accuracy`` (the mean grade), POPE's binary scores, the
    all-right-together figure, MME's ``score`` and the breakdowns."""

    def figures(rows: list[int]) -> dict[str, Any]:
        out: dict[str, Any] = {"accuracy": sum(scores[q] for q in rows) / len(rows), "questions": len(rows)}
        if task.grading == "pope":
            out |= binary_scores([read[q] or "" for q in rows], [task.references[q][0] for q in rows])
        if task.together is not None:
            value, count = group_all_right([scores[q] == 1.0 for q in rows], [task.together[q] for q in rows])
            out[task.together_metric] = value
            out[f"{task.together_metric} groups"] = count
        if task.grading == "mme":
            out["score"] = 100 * (out["accuracy"] + out["acc+"])
        if task.grading == "letter":
            out["unmatched"] = sum(read[q] is None for q in rows)
        return out

    return with_breakdowns(figures, len(scores), task.groups)


def submission(task: AnswerTask, per_query: list[dict]) -> list[dict[str, Any]]:
    """The replies in the benchmark server's format (``[{"question_id": 1, "answer": "2"}, …]``)."""
    assert task.submission is not None
    key, answer = task.submission["id"], task.submission["answer"]
    return [
        {key: int(r["id"]) if r["id"].isdigit() else r["id"], answer: r["read"] or r["reply"]}
        for r in per_query
    ]
