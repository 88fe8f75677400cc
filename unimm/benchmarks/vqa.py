"""Open-ended visual question answering: VQAv2, VizWiz, TextVQA (the VQA accuracy) and GQA.

Each question is asked with its image and LLaVA-1.5's evaluation instruction (``Answer the
question using a single word or phrase.``; VizWiz adds ``When the provided information is
insufficient, respond with 'Unanswerable'.``); the greedy reply is graded as the benchmark's own
script grades it (:mod:`unimm.benchmarks.scoring`). The layouts, as released:

``vqav2`` (visualqa.org)::

    v2_OpenEnded_mscoco_val2014_questions.json   {"questions": [{"question_id", "image_id", "question"}]}
    v2_mscoco_val2014_annotations.json           {"annotations": [{"question_id", "answers": [{"answer"}×10],
                                                   "answer_type", "question_type", …}]}
    val2014/COCO_val2014_000000262148.jpg        (image_id 262148)
    v2_OpenEnded_mscoco_test-dev2015_questions.json + test2015/   (--split test: test-dev)

``vizwiz`` (vizwiz.org)::

    Annotations/val.json   [{"image": "VizWiz_val_00000000.jpg", "question", "answers": [{"answer"}×10],
                             "answer_type", "answerable"}]
    val/VizWiz_val_00000000.jpg;   Annotations/test.json + test/   (--split test)

``textvqa`` (textvqa.org)::

    TextVQA_0.5.1_val.json   {"data": [{"question_id", "image_id", "question", "answers": [×10], …}]}
    train_images/<image_id>.jpg   (the val questions are about train_images)
    TextVQA_0.5.1_test.json + test_images/   (--split test)

``gqa`` (cs.stanford.edu/people/dorarad/gqa)::

    testdev_balanced_questions.json   {"<id>": {"imageId", "question", "answer", "types":
                                        {"structural", "semantic", "detailed"}, …}}
    val_balanced_questions.json       (--split val)
    images/<imageId>.jpg

The test splits of VQAv2, VizWiz and TextVQA come without answers: the replies are kept and
written as the benchmark server's submission file (``OUT`` with ``.submission.json``). Quirks:
the annotation file may sit beside the questions or in ``Annotations/``; a question without an
annotation, or an annotation whose answers are not ten strings, is an error naming it; an
unknown ``answer_type`` is reported as its own group; missing images are one error naming them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unimm.benchmarks.base import (
    AnswerTask,
    BenchmarkData,
    ImageFinder,
    Item,
    field,
    find_file,
    find_split_file,
    objects_of,
    read_json,
)
from unimm.errors import UnimmError

SPLITS = ("test", "val")
SHORT_ANSWER = "Answer the question using a single word or phrase."
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."

_VQAV2 = {
    "val": ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json", "val2014"),
    "test": ("v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015"),
}
_TEXTVQA = {
    "val": ("TextVQA_0.5.1_val.json", "train_images"),
    "test": ("TextVQA_0.5.1_test.json", "test_images"),
}
_GQA = {"test": "testdev_balanced_questions.json", "val": "val_balanced_questions.json"}


def load(benchmark, path: Path, *, image_root: Path | None, limit: int, split: str = "test") -> BenchmarkData:
    """The questions of one split as an :class:`AnswerTask` (see the module's layouts)."""
    reader = {"vqav2": _vqav2, "vizwiz": _vizwiz, "textvqa": _textvqa, "gqa": _gqa}[benchmark.name]
    questions, files, root, folder, extra = reader(benchmark, path, split)
    notes = []
    if limit and limit < len(questions):
        notes.append(
            f"--limit {limit}: {limit} of the {len(questions)} questions; not comparable to published figures"
        )
        questions = questions[:limit]
    finder = ImageFinder(image_root or root, [folder, "images", ""], benchmark.name)
    prompts = []
    for q in questions:
        instruction = f"{q['question']}\n{extra}{SHORT_ANSWER}"
        prompts.append(Item(q["id"], (("image", finder(q["image"]) or ""), ("text", instruction))))
    finder.check()
    answered = all(q["answers"] is not None for q in questions)
    if not answered:
        notes.append(
            f"the {split} split's answers are not released: the replies are written for the "
            f"{benchmark.name} server (--out … .submission.json)"
        )
    groups: dict[str, list[str]] = {}
    for key in questions[0]["groups"] if questions else ():
        groups[key] = [q["groups"][key] for q in questions]
    task = AnswerTask(
        name=benchmark.name,
        ids=[q["id"] for q in questions],
        prompts=prompts,
        references=[q["answers"] or [] for q in questions],
        grading="exact" if benchmark.name == "gqa" else "vqa",
        groups=groups,
        submission=None if answered else _SUBMISSION[benchmark.name],
        max_new_tokens=16,
    )
    return BenchmarkData(
        benchmark=benchmark.name,
        root=str(finder.root),
        tasks=[task],
        files=[str(f) for f in files],
        images=[part for item in prompts for kind, part in item.parts if kind == "image"],
        notes=notes,
    )


_SUBMISSION = {
    "vqav2": {"id": "question_id", "answer": "answer"},
    "textvqa": {"id": "question_id", "answer": "answer"},
    "vizwiz": {"id": "image", "answer": "answer"},
}


def _question(qid: Any, image: str, question: str, answers: list[str] | None, **groups: str) -> dict:
    return {"id": str(qid), "image": image, "question": question, "answers": answers, "groups": groups}


def _ten_answers(raw: Any, where: str) -> list[str]:
    """The human answers of one question: a list of strings, or of ``{"answer": str}``."""
    if not isinstance(raw, list) or not raw:
        raise UnimmError(f"{where}: 'answers' should be a list of the annotators' answers")
    out = []
    for a in raw:
        text = a.get("answer") if isinstance(a, dict) else a
        if not isinstance(text, str):
            raise UnimmError(f"{where}: an answer is {type(text).__name__}, not text")
        out.append(text)
    return out


def _vqav2(benchmark, path: Path, split: str) -> tuple[list[dict], list[Path], Path, str, str]:
    q_name, a_name, folder = _VQAV2[split]
    names = {s: [_VQAV2[s][0]] for s in SPLITS}
    q_file = find_split_file(path, split, names, benchmark.name, f"{q_name} ({benchmark.expects})")
    files = [q_file]
    doc = read_json(q_file)
    raw = doc.get("questions") if isinstance(doc, dict) else None
    if not isinstance(raw, list):
        raise UnimmError(f"{q_file}: no 'questions' list; expected the VQAv2 questions file")
    annotations: dict[int, dict] = {}
    if a_name:
        a_file = find_file(q_file.parent, [a_name, f"Annotations/{a_name}"], benchmark.name, a_name)
        files.append(a_file)
        adoc = read_json(a_file)
        rows = adoc.get("annotations") if isinstance(adoc, dict) else None
        if not isinstance(rows, list):
            raise UnimmError(f"{a_file}: no 'annotations' list; expected the VQAv2 annotations file")
        annotations = {row.get("question_id"): row for row in rows if isinstance(row, dict)}
    questions = []
    for _, where, q in objects_of(enumerate(raw), lambda n: f"{q_file}: question {n}"):
        qid = field(q, "question_id", int, where)
        image_id = field(q, "image_id", int, where)
        text = field(q, "question", str, where)
        answers, groups = None, {}
        if a_name:
            ann = annotations.get(qid)
            if ann is None:
                raise UnimmError(f"{where}: question_id {qid} has no annotation in {files[1]}")
            answers = _ten_answers(ann.get("answers"), f"{files[1]}: question_id {qid}")
            groups = {"answer_type": str(ann.get("answer_type", "unknown"))}
        questions.append(_question(qid, f"COCO_{folder}_{image_id:012d}", text, answers, **groups))
    return questions, files, q_file.parent, folder, ""


def _vizwiz(benchmark, path: Path, split: str) -> tuple[list[dict], list[Path], Path, str, str]:
    name = f"{split}.json"
    names = {s: [f"{s}.json", f"Annotations/{s}.json"] for s in SPLITS}
    file = find_split_file(path, split, names, benchmark.name, f"{name} ({benchmark.expects})")
    rows = read_json(file)
    if not isinstance(rows, list):
        raise UnimmError(f"{file}: expected a list of questions (VizWiz's {name})")
    questions = []
    for _, where, row in objects_of(enumerate(rows), lambda n: f"{file}: question {n}"):
        image = field(row, "image", str, where)
        text = field(row, "question", str, where)
        answers = _ten_answers(row.get("answers"), where) if split != "test" else None
        groups = {"answer_type": str(row.get("answer_type", "unknown"))} if answers else {}
        questions.append(_question(image, image, text, answers, **groups))
    root = file.parent.parent if file.parent.name == "Annotations" else file.parent
    return questions, [file], root, split, UNANSWERABLE + "\n"


def _textvqa(benchmark, path: Path, split: str) -> tuple[list[dict], list[Path], Path, str, str]:
    name, folder = _TEXTVQA[split]
    names = {s: [_TEXTVQA[s][0]] for s in SPLITS}
    file = find_split_file(path, split, names, benchmark.name, f"{name} ({benchmark.expects})")
    doc = read_json(file)
    rows = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise UnimmError(f"{file}: no 'data' list; expected TextVQA's {name}")
    questions = []
    for _, where, row in objects_of(enumerate(rows), lambda n: f"{file}: data[{n}]"):
        qid = field(row, "question_id", int, where)
        answers = _ten_answers(row.get("answers"), where) if split != "test" else None
        questions.append(
            _question(qid, field(row, "image_id", str, where), field(row, "question", str, where), answers)
        )
    return questions, [file], file.parent, folder, ""


def _gqa(benchmark, path: Path, split: str) -> tuple[list[dict], list[Path], Path, str, str]:
    name = _GQA[split]
    names = {s: [_GQA[s], f"questions/{_GQA[s]}"] for s in SPLITS}
    file = find_split_file(path, split, names, benchmark.name, f"{name} ({benchmark.expects})")
    rows = read_json(file)
    if not isinstance(rows, dict):
        raise UnimmError(f"{file}: expected an object of questions by id (GQA's {name})")
    questions = []
    for qid, where, row in objects_of(rows.items(), lambda q: f"{file}: question {q}"):
        types = row.get("types") if isinstance(row.get("types"), dict) else {}
        questions.append(
            _question(
                qid,
                field(row, "imageId", str, where),
                field(row, "question", str, where),
                [field(row, "answer", str, where)],
                structural=str(types.get("structural", "unknown")),
                semantic=str(types.get("semantic", "unknown")),
            )
        )
    root = file.parent.parent if file.parent.name == "questions" else file.parent
    return questions, [file], root, "images", ""
