"""Judge-scored benchmarks: LLaVA-Bench (In-the-Wild) and MM-Vet, graded by a language model
behind any OpenAI-compatible endpoint (``unimm eval --benchmark NAME --judge URL``).

``llava-w`` — ``liuhaotian/llava-bench-in-the-wild``::

    questions.jsonl      {"question_id", "image": "001.jpg", "text", "category": conv|detail|complex}
    context.jsonl        {"image": "001.jpg", "caption"}     (what the judge is told the image shows)
    answers_gpt4.jsonl   {"question_id", "text"}             (the reference answer)
    images/001.jpg

LLaVA's protocol: the judge sees the image's caption, the question, the reference answer as
"Assistant 1" and the model's as "Assistant 2", and rates both from 1 to 10 on its reply's first
line; the figure per category and overall is the model's total over the reference's, × 100. A
first line that is not two numbers (LLaVA's reading: commas as spaces, exactly two fields) is a
judge failure, counted and left out.

``mm-vet`` — ``mm-vet.zip`` of the MM-Vet release::

    mm-vet.json   {"v1_0": {"imagename": "v1_0.png", "question", "answer", "capability": ["rec", "ocr"]}}
    images/v1_0.png

MM-Vet's protocol: the judge completes a few-shot table of (question, ground truth, prediction,
correctness) with a score from 0.0 to 1.0 (``<AND>``/``<OR>`` in the ground truth as MM-Vet
defines them); a reply that is not such a number is asked again (at temperature 0, 0.5, 1.0) and
scores 0.0 after the third, counted as a judge failure. Figures: the mean × 100 overall and per
capability (a question counts for each of its capabilities).

Both prompts follow the published protocols in our own words, so figures are comparable in kind
but depend on the judge: the published ones used GPT-4 (0314 for LLaVA-W, 0613 for MM-Vet).
Replies are generated up to ``max_new_tokens`` (512) and kept whole. The judge's key, if it needs
one, is read from ``$OPENAI_API_KEY`` and never written anywhere.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from unimm.benchmarks.base import (
    AnswerTask,
    BenchmarkData,
    ImageFinder,
    Item,
    field,
    find_file,
    objects_of,
    read_json,
    read_jsonl,
)
from unimm.benchmarks.scoring import with_breakdowns
from unimm.errors import UnimmError

SPLITS = ("test",)
JUDGED = ("llava-w", "mm-vet")
LONG_REPLY = 512


def load(benchmark, path: Path, *, image_root: Path | None, limit: int, split: str = "test") -> BenchmarkData:
    """The questions as an :class:`AnswerTask` graded by a judge (``--judge`` URL)."""
    task, files, finder, notes = (_llava_w if benchmark.name == "llava-w" else _mm_vet)(
        benchmark, path, image_root
    )
    if limit and limit < len(task.ids):
        notes.append(
            f"--limit {limit}: {limit} of the {len(task.ids)} questions; not comparable to published figures"
        )
        for name in ("ids", "prompts", "references", "extras"):
            setattr(task, name, getattr(task, name)[:limit])
        task.groups = {k: v[:limit] for k, v in task.groups.items()}
    finder.check()
    return BenchmarkData(
        benchmark=benchmark.name,
        root=str(finder.root),
        tasks=[task],
        files=[str(f) for f in files],
        images=[part for item in task.prompts for kind, part in item.parts if kind == "image"],
        notes=notes,
    )


def _llava_w(benchmark, path: Path, image_root: Path | None):
    questions = find_file(path, ["questions.jsonl"], benchmark.name, benchmark.expects)
    folder = questions.parent
    answers = find_file(
        folder, ["answers_gpt4.jsonl"], benchmark.name, "answers_gpt4.jsonl beside questions.jsonl"
    )
    context = find_file(folder, ["context.jsonl"], benchmark.name, "context.jsonl beside questions.jsonl")
    captions = {
        field(row, "image", str, f"{context}:{n}"): str(row.get("caption", ""))
        for n, row in read_jsonl(context)
    }
    reference = {
        row.get("question_id"): field(row, "text", str, f"{answers}:{n}") for n, row in read_jsonl(answers)
    }
    finder = ImageFinder(image_root or folder, ["images", ""], benchmark.name)
    ids, prompts, refs, categories, extras = [], [], [], [], []
    for n, row in read_jsonl(questions):
        where = f"{questions}:{n}"
        qid, image = row.get("question_id"), field(row, "image", str, where)
        text = field(row, "text", str, where)
        if qid not in reference:
            raise UnimmError(f"{where}: question_id {qid} has no reference answer in {answers}")
        ids.append(str(qid))
        prompts.append(Item(str(qid), (("image", finder(image) or ""), ("text", text))))
        refs.append([reference[qid]])
        categories.append(str(row.get("category", "unknown")))
        extras.append({"question": text, "caption": captions.get(image, "")})
    task = AnswerTask(
        "llava-w", ids, prompts, refs, grading="llava-w", groups={"category": categories},
        max_new_tokens=LONG_REPLY, first_line=False, extras=extras,
    )  # fmt: skip
    return task, [questions, answers, context], finder, []


def _mm_vet(benchmark, path: Path, image_root: Path | None):
    file = find_file(path, ["mm-vet.json"], benchmark.name, benchmark.expects)
    doc = read_json(file)
    if not isinstance(doc, dict):
        raise UnimmError(f"{file}: expected an object of questions by id (MM-Vet's mm-vet.json)")
    finder = ImageFinder(image_root or file.parent, ["images", ""], benchmark.name)
    ids, prompts, refs, extras = [], [], [], []
    for qid, where, row in objects_of(doc.items(), lambda q: f"{file}: {q}"):
        question = field(row, "question", str, where)
        ids.append(qid)
        prompts.append(
            Item(qid, (("image", finder(field(row, "imagename", str, where)) or ""), ("text", question)))
        )
        refs.append([field(row, "answer", str, where)])
        extras.append({"question": question, "capability": [str(c) for c in row.get("capability") or []]})
    task = AnswerTask(
        "mm-vet",
        ids,
        prompts,
        refs,
        grading="mm-vet",
        max_new_tokens=LONG_REPLY,
        first_line=False,
        extras=extras,
    )
    return task, [file], finder, []


# ---------------------------------------------------------------------------------------------
# The judge


class Judge:
    """A chat model behind an OpenAI-compatible endpoint (``URL`` or ``URL/v1``; ``/chat/completions``
    is added when the URL does not end with it)."""

    def __init__(self, url: str, model: str, *, timeout: float = 300.0) -> None:
        base = url.rstrip("/")
        if not base.endswith("/chat/completions"):
            base = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.url, self.model, self.timeout = base, model, timeout
        self.calls = 0

    def ask(self, messages: list[dict[str, str]], *, temperature: float = 0.0, max_tokens: int = 256) -> str:
        """The judge's reply to ``messages``.

        Raises:
            UnimmError: the endpoint cannot be reached or answers with an error or a non-chat body.
        """
        body = json.dumps(
            {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        ).encode()
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        for attempt in range(3):  # a busy endpoint (429, 5xx) or a dropped connection is tried again
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    doc = json.loads(response.read().decode("utf-8"))
                break
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode("utf-8", "replace")[:300]
                if exc.code not in (429, 500, 502, 503, 504) or attempt == 2:
                    raise UnimmError(f"--judge {self.url}: HTTP {exc.code} ({detail})") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                if attempt == 2:
                    reason = getattr(exc, "reason", exc)
                    raise UnimmError(f"--judge {self.url}: cannot reach it ({reason})") from None
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise UnimmError(
                    f"--judge {self.url}: the reply is not JSON; is it a chat-completions endpoint?"
                ) from None
            time.sleep(2.0 * (attempt + 1))
        self.calls += 1
        try:
            return str(doc["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise UnimmError(f"--judge {self.url}: the reply has no choices[0].message.content") from None


LLAVA_W_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
LLAVA_W_INSTRUCTION = (
    "We would like your feedback on the performance of two AI assistants answering the user question "
    "above. The user asks the question while looking at an image, whose visual content is described to "
    "you by the sentences under [Context].\nRate the helpfulness, relevance, accuracy and level of detail "
    "of their responses. Each assistant receives an overall score from 1 to 10; a higher score means a "
    "better overall performance.\nFirst output a single line containing only two values, the scores for "
    "Assistant 1 and Assistant 2, separated by a space. On the following lines, explain your evaluation, "
    "avoiding any bias and making sure the order in which the responses were presented does not affect "
    "your judgment."
)
MM_VET_INSTRUCTION = """Compare the ground truth and the prediction of an AI model and give the prediction a correctness score. <AND> in the ground truth means the prediction is totally right only when it has every element of the ground truth; <OR> means it is totally right when it has any one of them. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9 or 1.0 (totally right). Complete only the last field, the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or x = -1 | 1.0
Can you explain this meme? | The meme jokes that people put off their work until the deadline is close. | The meme shows a person sleeping and then running late to work. | 0.4
What colour is the car? | red <OR> dark red | The car is dark red. | 1.0
"""  # noqa: E501  (a table the judge reads: one example a line)


def llava_w_messages(caption: str, question: str, reference: str, reply: str) -> list[dict[str, str]]:
    """The judge's conversation for one LLaVA-W question (the reference is Assistant 1)."""
    content = (
        f"[Context]\n{caption}\n\n[Question]\n{question}\n\n"
        f"[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{reply}\n\n[End of Assistant 2]\n\n[System]\n{LLAVA_W_INSTRUCTION}\n\n"
    )
    return [{"role": "system", "content": LLAVA_W_SYSTEM}, {"role": "user", "content": content}]


def mm_vet_messages(question: str, truth: str, reply: str) -> list[dict[str, str]]:
    """The judge's conversation for one MM-Vet question."""
    row = " | ".join(part.replace("\n", "<br>") for part in (question, truth, reply))
    return [{"role": "user", "content": f"{MM_VET_INSTRUCTION}{row} |"}]


def score_pair(review: str) -> tuple[float, float] | None:
    """LLaVA's reading of a review: its first line, commas as spaces, exactly two numbers."""
    fields = review.split("\n", 1)[0].replace(",", " ").split()
    try:
        return (float(fields[0]), float(fields[1])) if len(fields) == 2 else None
    except ValueError:
        return None


def correctness(reply: str) -> float | None:
    """MM-Vet's reading of a judge reply: the whole reply is a number from 0 to 1."""
    try:
        value = float(reply.strip())
    except ValueError:
        return None
    return value if 0.0 <= value <= 1.0 else None


def judge_task(
    judge: Judge, task: AnswerTask, replies: list[str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ask the judge about every reply: the task's figures and, per question, the judge's verdict."""
    verdicts: list[dict[str, Any]] = []
    for q, reply in enumerate(replies):
        extra, reference = task.extras[q], task.references[q][0]
        if task.grading == "llava-w":
            review = judge.ask(
                llava_w_messages(extra["caption"], extra["question"], reference, reply), max_tokens=1024
            )
            verdicts.append({"judge": review, "scores": score_pair(review)})
        else:
            for temperature in (0.0, 0.5, 1.0):
                said = judge.ask(
                    mm_vet_messages(extra["question"], reference, reply),
                    temperature=temperature,
                    max_tokens=8,
                )
                if (value := correctness(said)) is not None:
                    break
            verdicts.append({"judge": said, "score": value})
    return judged_metrics(task, verdicts), verdicts


def judged_metrics(task: AnswerTask, verdicts: list[dict[str, Any]]) -> dict[str, Any]:
    """LLaVA-W's relative scores (overall, per category) or MM-Vet's mean scores (overall, per
    capability), from the judge's verdicts; failures counted."""
    if task.grading == "llava-w":
        pairs = [v["scores"] for v in verdicts]

        def relative(rows: list[int]) -> dict[str, Any]:
            good = [pairs[q] for q in rows if pairs[q] is not None]
            ref, ours = sum(p[0] for p in good), sum(p[1] for p in good)
            return {
                "relative_score": 100 * ours / ref if ref else None,
                "model_mean": ours / len(good) if good else None,
                "reference_mean": ref / len(good) if good else None,
                "questions": len(rows),
                "judge_failures": len(rows) - len(good),
            }

        return with_breakdowns(relative, len(verdicts), task.groups)
    scores = [v["score"] if v["score"] is not None else 0.0 for v in verdicts]
    metrics = {
        "score": 100 * sum(scores) / len(scores) if scores else None,
        "questions": len(scores),
        "judge_failures": sum(v["score"] is None for v in verdicts),
    }
    by_capability: dict[str, list[float]] = {}
    for q, extra in enumerate(task.extras):
        for capability in extra.get("capability", []):
            by_capability.setdefault(capability, []).append(scores[q])
    metrics["by_capability"] = {
        c: {"score": 100 * sum(s) / len(s), "questions": len(s)} for c, s in sorted(by_capability.items())
    }
    return metrics
