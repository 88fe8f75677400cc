"""Yes/no benchmarks: POPE (object hallucination) and MME (14 perception and cognition subtasks).

``pope`` — the POPE release (github.com/AoiDragon/POPE, also shipped with LLaVA's evaluation)::

    coco_pope_adversarial.json   one JSON object per line: {"question_id", "image":
    coco_pope_popular.json         "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard
    coco_pope_random.json          in the image?", "label": "yes"}
    val2014/COCO_val2014_….jpg   (the COCO images; --image-root where they are)

One task per question file present (the three above, or ``<dataset>_pope_<kind>.json`` for
A-OKVQA and GQA); each reply is read by POPE's rule (no/not in its first sentence → ``no``) and
scored with ``yes`` the positive class: accuracy, precision, recall, F1 and the yes ratio, with
their means over the files.

``mme`` — ``MME_Benchmark_release_version/``, one folder per subtask::

    existence/000000006040.jpg + existence/000000006040.txt       (images and questions side by side)
    artwork/images/10002.jpg + artwork/questions_answers_YN/10002.txt   (or in two subfolders)

Each ``.txt`` holds one question per line, ``question<TAB>Yes|No`` (two per image). A reply is
read by MME's rule (``yes``/``no``, else its first four characters; anything else is wrong).
Per subtask: ``accuracy`` over questions, ``acc+`` over images (both questions right) and
``score`` = 100·(accuracy + acc+); the totals ``perception`` (10 subtasks) and ``cognition`` (4)
sum the scores, as the MME leaderboard does. A subtask folder outside the 14 is scored and left
out of the totals (noted); a line that is not ``question<TAB>Yes|No`` is an error naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

from unimm.benchmarks.base import AnswerTask, BenchmarkData, ImageFinder, Item, field, listing, read_jsonl
from unimm.errors import UnimmError

SPLITS = ("test",)
SHORT_ANSWER = "Answer the question using a single word or phrase."
PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def load(benchmark, path: Path, *, image_root: Path | None, limit: int, split: str = "test") -> BenchmarkData:
    """POPE's question files or MME's subtask folders, one :class:`AnswerTask` each."""
    return (_pope if benchmark.name == "pope" else _mme)(benchmark, path, image_root, limit)


def _pope(benchmark, path: Path, image_root: Path | None, limit: int) -> BenchmarkData:
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.is_file() and "_pope_" in p.name and p.suffix == ".json"
        )
    else:
        raise UnimmError(f"{path}: no such file or folder (the pope benchmark: {benchmark.expects})")
    if not files:
        raise UnimmError(
            f"{path}: not the pope benchmark; expected {benchmark.expects}, found {listing(path)}"
        )
    finder = ImageFinder(image_root or files[0].parent, ["val2014", "images", ""], "pope")
    tasks, notes = [], []
    for file in files:
        rows = read_jsonl(file)
        if limit and limit < len(rows):
            notes.append(f"--limit {limit}: {limit} of the {len(rows)} questions of {file.name}")
            rows = rows[:limit]
        ids, prompts, labels = [], [], []
        for line, row in rows:
            where = f"{file}:{line}"
            label = field(row, "label", str, where).strip().lower()
            if label not in ("yes", "no"):
                raise UnimmError(f"{where}: label {row['label']!r} should be yes or no")
            qid = str(row.get("question_id", line))
            ids.append(qid)
            text = f"{field(row, 'text', str, where)}\n{SHORT_ANSWER}"
            prompts.append(
                Item(qid, (("image", finder(field(row, "image", str, where)) or ""), ("text", text)))
            )
            labels.append([label])
        name = file.stem.split("_pope_", 1)[-1] if "_pope_" in file.stem else file.stem
        tasks.append(AnswerTask(name, ids, prompts, labels, grading="pope", max_new_tokens=8))
    finder.check()
    names = [t.name for t in tasks]
    return BenchmarkData(
        benchmark="pope",
        root=str(finder.root),
        tasks=tasks,
        files=[str(f) for f in files],
        images=[part for t in tasks for item in t.prompts for kind, part in item.parts if kind == "image"],
        notes=notes,
        averages={"F1": ("F1", names), "accuracy": ("accuracy", names)},  # one file: its own figures
    )


def _mme(benchmark, path: Path, image_root: Path | None, limit: int) -> BenchmarkData:
    if not path.is_dir():
        raise UnimmError(f"{path}: not a folder (the mme benchmark: {benchmark.expects})")
    root = (
        path / "MME_Benchmark_release_version" if (path / "MME_Benchmark_release_version").is_dir() else path
    )
    subtasks = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    known = [s for s in subtasks if s in (*PERCEPTION, *COGNITION)]
    if not known:
        raise UnimmError(
            f"{root}: not the mme benchmark; expected {benchmark.expects}, found {listing(root)}"
        )
    finder = ImageFinder(image_root or root, [""], "mme")
    tasks, files, notes = [], [], []
    for subtask in subtasks:
        task, read = _mme_subtask(root, subtask, finder, limit)
        if task is not None:
            tasks.append(task)
            files.extend(read)
    finder.check()
    unknown = [t.name for t in tasks if t.name not in (*PERCEPTION, *COGNITION)]
    if unknown:
        notes.append(f"not MME subtasks, left out of the totals: {', '.join(unknown)}")
    missing = [s for s in (*PERCEPTION, *COGNITION) if s not in subtasks]
    if missing:
        notes.append(f"subtasks not found, the totals are over those present: missing {', '.join(missing)}")
    if limit:
        notes.append(
            f"--limit {limit}: the first {limit} images of each subtask; not comparable to published figures"
        )
    present = {t.name for t in tasks}
    totals = {
        name: ("score", [s for s in group if s in present])
        for name, group in (("perception", PERCEPTION), ("cognition", COGNITION))
        if any(s in present for s in group)
    }
    return BenchmarkData(
        benchmark="mme",
        root=str(finder.root),
        tasks=tasks,
        files=files,
        images=[part for t in tasks for item in t.prompts for kind, part in item.parts if kind == "image"],
        notes=notes,
        totals=totals,
    )


def _mme_subtask(
    root: Path, subtask: str, finder: ImageFinder, limit: int
) -> tuple[AnswerTask | None, list[str]]:
    folder = root / subtask
    split = (folder / "questions_answers_YN").is_dir()
    text_dir = folder / "questions_answers_YN" if split else folder
    image_dir = f"{subtask}/images" if split else subtask
    texts = sorted(p for p in text_dir.iterdir() if p.suffix == ".txt")
    if limit:
        texts = texts[:limit]
    ids, prompts, labels, images = [], [], [], []
    for txt in texts:
        try:
            lines = txt.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise UnimmError(f"{txt}: not UTF-8 text ({exc.reason})") from None
        image = finder(txt.stem, folder=image_dir)
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            question, tab, answer = line.rpartition("\t")
            if not tab or answer.strip().lower() not in ("yes", "no") or not question.strip():
                raise UnimmError(f"{txt}:{number}: expected 'question<TAB>Yes' or '…<TAB>No', got {line!r}")
            qid = f"{subtask}/{txt.stem}/{number}"
            ids.append(qid)
            prompts.append(
                Item(qid, (("image", image or ""), ("text", f"{question.strip()}\n{SHORT_ANSWER}")))
            )
            labels.append([answer.strip().lower()])
            images.append(f"{subtask}/{txt.stem}")
    if not ids:
        return None, []
    task = AnswerTask(
        subtask,
        ids,
        prompts,
        labels,
        grading="mme",
        together=images,
        together_metric="acc+",
        max_new_tokens=8,
    )
    return task, [os.fspath(t) for t in texts]
