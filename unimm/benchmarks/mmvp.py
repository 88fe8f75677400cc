"""MMVP (Tong et al., 2024): the MLLM benchmark (``mmvp``) and the CLIP-style pairs (``mmvp-vlm``).

``mmvp`` — the Hugging Face ``MMVP/MMVP`` release::

    Questions.csv   Index,Question,Options,Correct Answer
                    1,Are the butterfly's wings closer to being open or closed?,(a) Open (b) Closed,(a)
    MMVP Images/    1.jpg … 300.jpg   (question Index i asks about i.jpg)

Questions 1–2, 3–4, … are the 150 pairs: the same question about two images that a CLIP encoder
sees as alike. The prompt is the image, then the question and its options as the official
evaluation writes them (``Question + " " + Options``). Instead of the official free-form answer
graded by GPT-4, each option — written ``(a) Open`` — is scored as the reply by its summed token
log-probability and the likeliest is the answer (no judge, deterministic). Figures: accuracy over
questions and pair accuracy (both questions of a pair right, the published metric).

``mmvp-vlm`` — the ``MMVP/MMVP_VLM`` release::

    Questions.csv     Question ID,Type,Statement
                      1,Orientation,The butterfly's wings are open
    MLLM_VLM Images/  <Type>/<Question ID>.jpg   (nine folders, 15 pairs each)

Consecutive rows are a pair of statements about two images; as the official evaluation does,
each statement is prefixed ``a photo of `` and the pair is right when each statement is closer
to its own image than to the other (``pair_accuracy``, overall and per Type).

Handling of the release's quirks: a UTF-8 byte-order mark and spaces around header names are
accepted; the images folder may also be the misspelt ``MMVP Imgaes`` found in some copies, or
``images``; image names may lack their extension; missing images are an error naming them.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from unimm.benchmarks.base import BenchmarkData, ChoiceTask, ImageFinder, Item, PairTask, find_file
from unimm.errors import UnimmError

SPLITS = ("test",)
USUAL_PAIRS = {"mmvp": 150, "mmvp-vlm": 135}
_OPTION = re.compile(r"\(([a-zA-Z])\)\s*")


def load(benchmark, path: Path, *, image_root: Path | None, limit: int, split: str = "test") -> BenchmarkData:
    """``Questions.csv`` and its images: a choice task (``mmvp``) or a pair task (``mmvp-vlm``)."""
    file = find_file(path, ["Questions.csv"], benchmark.name, benchmark.expects)
    rows = _read_csv(file, _COLUMNS[benchmark.name])
    if len(rows) % 2:
        raise UnimmError(f"{file}: {len(rows)} questions, an odd number; the questions come in pairs")
    notes = []
    pairs = len(rows) // 2
    if limit:
        rows = rows[: 2 * limit]
        notes.append(
            f"--limit {limit}: {len(rows) // 2} of the {pairs} pairs; not comparable to published figures"
        )
    elif pairs != USUAL_PAIRS[benchmark.name]:
        notes.append(f"{pairs} pairs, not the release's {USUAL_PAIRS[benchmark.name]}")
    folders = (
        ["MMVP Images", "MMVP Imgaes", "images", ""]
        if benchmark.name == "mmvp"
        else ["MLLM_VLM Images", "images", ""]
    )
    finder = ImageFinder(image_root or file.parent, folders, benchmark.name)
    task = _choices(rows, file, finder) if benchmark.name == "mmvp" else _statements(rows, file, finder)
    finder.check()
    items = task.prompts if isinstance(task, ChoiceTask) else [i for pair in task.images for i in pair]
    return BenchmarkData(
        benchmark=benchmark.name,
        root=str(finder.root),
        tasks=[task],
        files=[str(file)],
        images=[part for item in items for kind, part in item.parts if kind == "image"],
        notes=notes,
    )


_COLUMNS = {
    "mmvp": ("Index", "Question", "Options", "Correct Answer"),
    "mmvp-vlm": ("Question ID", "Type", "Statement"),
}


def _read_csv(file: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """``(line, row)`` of each non-blank row, with header names stripped; the columns checked."""
    try:
        with open(file, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in columns if c not in header]
            if missing:
                raise UnimmError(
                    f"{file}:1: no column {', '.join(repr(c) for c in missing)} (the header is "
                    f"{', '.join(header) or 'empty'}; expected {', '.join(columns)})"
                )
            rows = []
            for values in reader:
                if not any(v.strip() for v in values):
                    continue
                if len(values) < len(header):
                    raise UnimmError(
                        f"{file}:{reader.line_num}: {len(values)} fields, the header has {len(header)}"
                    )
                rows.append((reader.line_num, {h: v.strip() for h, v in zip(header, values, strict=False)}))
    except UnicodeDecodeError as exc:
        raise UnimmError(f"{file}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise UnimmError(f"{file}: not a readable CSV file ({exc})") from None
    if not rows:
        raise UnimmError(f"{file}: no question")
    return rows


def _number(value: str, where: str, column: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UnimmError(f"{where}: {column} {value!r} is not a number") from None


def _choices(rows: list, file: Path, finder: ImageFinder) -> ChoiceTask:
    ids, prompts, options, answers, groups = [], [], [], [], []
    for n, (line, row) in enumerate(rows):
        where = f"{file}:{line}"
        index = _number(row["Index"], where, "Index")
        letters, texts = _options(row["Options"], where)
        correct = row["Correct Answer"].strip().strip("()").strip().lower()
        if correct not in letters:
            raise UnimmError(
                f"{where}: Correct Answer {row['Correct Answer']!r} is none of the options "
                f"({', '.join(f'({x})' for x in letters)})"
            )
        image = finder(str(index))
        question = f"{row['Question']} {row['Options']}"
        ids.append(str(index))
        prompts.append(Item(str(index), (("image", image or ""), ("text", question))))
        options.append([f"({x}) {t}" for x, t in zip(letters, texts, strict=True)])
        answers.append(letters.index(correct))
        groups.append(f"pair-{n // 2 + 1}")
    return ChoiceTask("mmvp", ids, prompts, options, answers, groups)


def _options(text: str, where: str) -> tuple[list[str], list[str]]:
    """``"(a) Open (b) Closed"`` → ``(["a", "b"], ["Open", "Closed"])``."""
    pieces = _OPTION.split(text)
    letters = [x.lower() for x in pieces[1::2]]
    texts = [t.strip() for t in pieces[2::2]]
    if len(letters) < 2 or pieces[0].strip() or not all(texts):
        raise UnimmError(f"{where}: Options {text!r} is not of the form '(a) … (b) …'")
    return letters, texts


def _statements(rows: list, file: Path, finder: ImageFinder) -> PairTask:
    ids, captions, images, types = [], [], [], []
    for first in range(0, len(rows), 2):
        pair = rows[first : first + 2]
        kinds = {row["Type"] for _, row in pair}
        if len(kinds) != 1:
            lines = " and ".join(str(line) for line, _ in pair)
            raise UnimmError(
                f"{file}:{lines}: a pair of statements of two types ({', '.join(sorted(kinds))})"
            )
        qids = [_number(row["Question ID"], f"{file}:{line}", "Question ID") for line, row in pair]
        found = [
            finder(str(q), folder=_folder(finder, row["Type"]))
            for q, (_, row) in zip(qids, pair, strict=True)
        ]
        example = f"{qids[0]}-{qids[1]}"
        ids.append(example)
        captions.append(
            tuple(
                Item.text(f"{q}:statement", "a photo of " + row["Statement"])
                for q, (_, row) in zip(qids, pair, strict=True)
            )
        )
        images.append(tuple(Item.image(f"{q}:image", f or "") for q, f in zip(qids, found, strict=True)))
        types.append(pair[0][1]["Type"])
    return PairTask("mmvp-vlm", ids, captions, images, {"type": types}, pair_accuracy="image")


def _folder(finder: ImageFinder, kind: str) -> str:
    """The ``<Type>`` folder under the release's images folder."""
    base = finder.folders[0]
    return f"{base}/{kind}" if base else kind
