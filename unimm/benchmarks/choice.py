"""Multiple-choice benchmarks: ScienceQA-IMG and MMBench, each scored two ways.

Every question is asked as LLaVA-1.5's evaluation asks it — the image, the context, the
question, the options as ``A. …`` lines, then ``Answer with the option's letter from the given
choices directly.`` — and scored (1) by **generation**: the greedy reply's letter
(:func:`~unimm.benchmarks.scoring.option_letter`: a letter, ``B. …``, ``the answer is B`` or an
option's text; anything else is wrong and counted as ``unmatched``), and (2) by **likelihood**:
the option letter with the highest log-probability as the reply (deterministic, no parsing).

``scienceqa-img`` — the ScienceQA release (github.com/lupantech/ScienceQA, ``data/scienceqa``)::

    problems.json     {"<pid>": {"question", "choices": [...], "answer": 0, "hint", "image":
                       "image.png" | null, "split", "subject", "grade", …}}
    pid_splits.json   {"test": ["<pid>", …], "val": […], …}
    images/test/<pid>/image.png   (or test/<pid>/image.png)

IMG is the problems of the split that have an image (2017 of the 4241 test problems). Breakdowns
by ``subject`` (natural / social / language science) and ``grade``.

``mmbench`` — the OpenCompass TSV files (``MMBench_DEV_EN.tsv``: ``--split val``, the dev set with
answers; ``MMBench_TEST_EN.tsv``: ``--split test``, no answers)::

    index  question  hint  A  B  C  D  answer  category  l2-category  image (base64)  …

**Circular evaluation**, as MMBench defines it: a question with k options is asked k times with
its options rotated (A B C D, B C D A, …), and counts as right only when every rotation is
(``circular_accuracy``, also per ``category``); ``accuracy`` is over the single asks. An
``image`` cell that is a row's index (later MMBench versions store a repeated image once) refers
to that row's image. Options that are empty (``nan``) end the option list. The test TSV has no
``answer`` column: the replies are kept (no figures).
"""

from __future__ import annotations

import base64
import binascii
import csv
import sys
from pathlib import Path

from unimm.benchmarks.base import (
    AnswerTask,
    BenchmarkData,
    ChoiceTask,
    ImageFinder,
    Item,
    field,
    find_file,
    find_split_file,
    read_json,
)
from unimm.benchmarks.scoring import LETTERS
from unimm.errors import UnimmError

SPLITS = ("test", "val")
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
_MMBENCH = {"val": "MMBench_DEV_EN.tsv", "test": "MMBench_TEST_EN.tsv"}


def load(benchmark, path: Path, *, image_root: Path | None, limit: int, split: str = "test") -> BenchmarkData:
    """The questions as two tasks: ``generation`` (the reply's letter) and ``likelihood``."""
    reader = _scienceqa if benchmark.name == "scienceqa-img" else _mmbench
    return reader(benchmark, path, image_root, limit, split)


def prompt_text(question: str, options: list[str], context: str = "") -> str:
    """The question as LLaVA-1.5's evaluation writes it (context, question, lettered options)."""
    lines = [f"Context: {context}"] if context.strip() else []
    lines.append(question)
    lines += [f"{LETTERS[i]}. {option}" for i, option in enumerate(options)]
    lines.append(LETTER_ANSWER)
    return "\n".join(lines)


def _two_tasks(
    name: str, ids, prompts, options, answers, *, together=None, together_metric="group_accuracy", groups=None
) -> list:
    """The generation task and the likelihood task over the same questions."""
    groups = groups or {}
    generation = AnswerTask(
        f"{name}:generation",
        ids,
        prompts,
        [[LETTERS[a]] if a is not None else [] for a in answers],
        grading="letter",
        groups=groups,
        together=together,
        together_metric=together_metric,
        options=options,
        max_new_tokens=8,
    )
    if any(a is None for a in answers):
        return [generation]
    likelihood = ChoiceTask(
        f"{name}:likelihood",
        ids,
        prompts,
        [[LETTERS[i] for i in range(len(o))] for o in options],
        list(answers),
        together if together is not None else list(ids),
        group_metric=together_metric,
        group_count="groups",
        breakdowns=groups,
    )
    return [generation, likelihood]


def _scienceqa(benchmark, path: Path, image_root: Path | None, limit: int, split: str) -> BenchmarkData:
    problems_file = find_file(
        path, ["problems.json", "data/scienceqa/problems.json"], benchmark.name, benchmark.expects
    )
    splits_file = find_file(
        problems_file.parent, ["pid_splits.json"], benchmark.name, "pid_splits.json beside problems.json"
    )
    problems, splits = read_json(problems_file), read_json(splits_file)
    if (
        not isinstance(problems, dict)
        or not isinstance(splits, dict)
        or not isinstance(splits.get(split), list)
    ):
        raise UnimmError(
            f"{problems_file}: expected ScienceQA's problems by id and a {split!r} list in {splits_file}"
        )
    finder = ImageFinder(image_root or problems_file.parent, ["images", ""], benchmark.name)
    ids, prompts, options, answers, subjects, grades = [], [], [], [], [], []
    pids = [p for p in splits[split] if isinstance(problems.get(p), dict) and problems[p].get("image")]
    notes = [f"IMG: {len(pids)} of the {len(splits[split])} {split} problems have an image"]
    if limit and limit < len(pids):
        notes.append(
            f"--limit {limit}: {limit} of the {len(pids)} questions; not comparable to published figures"
        )
        pids = pids[:limit]
    for pid in pids:
        row, where = problems[pid], f"{problems_file}: problem {pid}"
        choices = field(row, "choices", list, where)
        answer = field(row, "answer", int, where)
        if not 2 <= len(choices) <= len(LETTERS) or not 0 <= answer < len(choices):
            raise UnimmError(f"{where}: answer {answer} is not one of its {len(choices)} choices")
        image = finder(f"{split}/{pid}/{row['image']}")
        text = prompt_text(
            field(row, "question", str, where), [str(c) for c in choices], str(row.get("hint") or "")
        )
        ids.append(pid)
        prompts.append(Item(pid, (("image", image or ""), ("text", text))))
        options.append([str(c) for c in choices])
        answers.append(answer)
        subjects.append(str(row.get("subject", "unknown")))
        grades.append(str(row.get("grade", "unknown")))
    finder.check()
    return BenchmarkData(
        benchmark=benchmark.name,
        root=str(finder.root),
        tasks=_two_tasks(
            "scienceqa-img", ids, prompts, options, answers, groups={"subject": subjects, "grade": grades}
        ),
        files=[str(problems_file), str(splits_file)],
        images=[part for item in prompts for kind, part in item.parts if kind == "image"],
        notes=notes,
    )


def _read_tsv(file: Path) -> list[tuple[int, dict[str, str]]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a base64 image is one cell
    try:
        with open(file, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            rows = [(reader.line_num, row) for row in reader]
            header = reader.fieldnames or []
    except UnicodeDecodeError as exc:
        raise UnimmError(f"{file}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise UnimmError(f"{file}: not a readable TSV file ({exc})") from None
    missing = [c for c in ("index", "question", "A", "B", "image") if c not in header]
    if missing:
        raise UnimmError(
            f"{file}:1: no column {', '.join(missing)}; expected MMBench's TSV "
            "(index, question, hint, A–D, answer, image)"
        )
    return rows


def _empty(value: str | None) -> bool:
    return value is None or value.strip() in ("", "nan", "NaN", "None")


def _mmbench(benchmark, path: Path, image_root: Path | None, limit: int, split: str) -> BenchmarkData:
    names = {s: [_MMBENCH[s], _MMBENCH[s].replace("_EN", "_EN_V11")] for s in SPLITS}
    file = find_split_file(path, split, names, benchmark.name, benchmark.expects)
    rows = _read_tsv(file)
    images = {
        row["index"]: row["image"]
        for _, row in rows
        if not _empty(row.get("image")) and len(row["image"]) > 64
    }
    notes = []
    if limit and limit < len(rows):
        notes.append(
            f"--limit {limit}: {limit} of the {len(rows)} questions; not comparable to published figures"
        )
        rows = rows[:limit]
    has_answers = all(not _empty(row.get("answer")) for _, row in rows)
    if not has_answers:
        notes.append(
            f"{file.name} has no answers: the replies are kept, no figures "
            "(the dev TSV, --split val, has them)"
        )
    ids, prompts, options, answers, together, categories = [], [], [], [], [], []
    for line, row in rows:
        where = f"{file}:{line}"
        texts = []
        for letter in LETTERS[:8]:
            if _empty(row.get(letter)):
                break
            texts.append(row[letter].strip())
        if len(texts) < 2:
            raise UnimmError(f"{where}: fewer than two options (columns A, B, …)")
        image = _image_cell(row["image"], images, where)
        right = None
        if has_answers:
            letter = row["answer"].strip()
            if letter not in LETTERS[: len(texts)]:
                raise UnimmError(f"{where}: answer {letter!r} is none of the options {LETTERS[: len(texts)]}")
            right = LETTERS.index(letter)
        hint = "" if _empty(row.get("hint")) else row["hint"]
        for shift in range(len(texts)):  # the circular evaluation: every rotation of the options
            rotated = texts[shift:] + texts[:shift]
            qid = f"{row['index']}" + (f"@{shift}" if shift else "")
            ids.append(qid)
            question = (hint + "\n" if hint else "") + row["question"]
            prompts.append(Item(qid, (("image_base64", image), ("text", prompt_text(question, rotated)))))
            options.append(rotated)
            answers.append(None if right is None else (right - shift) % len(texts))
            together.append(row["index"])
            categories.append(row.get("category") or "unknown")
    return BenchmarkData(
        benchmark=benchmark.name,
        root=str(file.parent),
        tasks=_two_tasks(
            "mmbench",
            ids,
            prompts,
            options,
            answers,
            together=together,
            together_metric="circular_accuracy",
            groups={"category": categories},
        ),
        files=[str(file)],
        images=[],
        notes=notes,
    )


def _image_cell(value: str, images: dict[str, str], where: str) -> str:
    """A row's base64 image: the cell itself, or the image of the row whose index it names."""
    data = images.get(value.strip(), value) if len(value.strip()) <= 64 else value
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UnimmError(
            f"{where}: the image cell is neither base64 image data nor the index of a row with one"
        ) from None
    return data
