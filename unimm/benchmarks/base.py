"""What a benchmark loader gives the runner: items to embed, ranking tasks, 2×2 pair tasks.

A loader reads a benchmark's official files into a :class:`BenchmarkData`: plain descriptions
of what to embed (:class:`Item`, images as confined paths, opened only when embedded) and of how
to score (:class:`RankingTask`, :class:`PairTask`). Nothing here touches a model, so loaders are
checked, and fail on bad input, before a checkpoint is loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from unimm.errors import UnimmError

PartKind = Literal["text", "image"]


@dataclasses.dataclass(frozen=True)
class Item:
    """One input to embed: an interleaved sequence of text and image parts.

    ``parts`` are ``("text", str)`` or ``("image", absolute path)``; two items with the same parts
    are the same input and are embedded once.
    """

    id: str
    parts: tuple[tuple[PartKind, str], ...]

    @classmethod
    def text(cls, id: str, text: str) -> Item:
        return cls(id, (("text", text),))

    @classmethod
    def image(cls, id: str, path: str | Path) -> Item:
        return cls(id, (("image", str(path)),))


@dataclasses.dataclass
class RankingTask:
    """Queries ranked against a gallery; each query's relevant gallery ids.

    ``candidates[q]`` (optional) restricts query ``q`` to those gallery ids (MMEB's per-query
    candidate lists); ``exclude[q]`` (optional) removes gallery ids from its ranking (VIST's
    images already in the story). Relevant ids must lie in what is left.
    """

    name: str
    queries: list[Item]
    gallery: list[Item]
    relevant: list[list[str]]
    candidates: list[list[str]] | None = None
    exclude: list[list[str]] | None = None
    precision_at_1: bool = False
    """Also report ``P@1`` (MMEB's name for the top candidate being relevant; with our hit-rate
    definition of R@k it equals ``R@1``)."""
    description: str = ""


@dataclasses.dataclass
class PairTask:
    """Winoground-shaped examples: two captions and two images each, caption c belonging to
    image c; scored by the 2×2 similarities (text, image and group scores)."""

    name: str
    ids: list[str]
    captions: list[tuple[Item, Item]]
    images: list[tuple[Item, Item]]
    groups: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    """Optional breakdowns: a field name (e.g. ``collapsed_tag``) → each example's value."""
    pair_accuracy: str | None = None
    """The 2×2 condition a benchmark reports as its ``pair_accuracy`` (MMVP-VLM: ``image``, each
    statement prefers its own image), or ``None``."""
    description: str = ""


@dataclasses.dataclass
class ChoiceTask:
    """Multiple-choice questions, each answered by the option the model finds most likely as its
    reply (summed token log-probabilities); questions sharing a group are right together or not at
    all (MMVP's pair accuracy)."""

    name: str
    ids: list[str]
    prompts: list[Item]
    options: list[list[str]]
    answers: list[int]
    """Index of each question's right option."""
    groups: list[str]
    description: str = ""
    group_metric: str = "pair_accuracy"
    """The name the all-right-together figure is reported under (MMBench: ``circular_accuracy``)."""
    group_count: str = "pairs"
    breakdowns: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    """Accuracy per value of a field (e.g. ScienceQA's ``subject``): the name → each question's value."""


@dataclasses.dataclass
class AnswerTask:
    """Questions answered by generation (greedy), each reply graded by the benchmark's rule.

    ``grading``: ``vqa`` (the VQA accuracy against the human answers), ``exact`` (GQA: lower
    case, no final period, equal to the answer), ``pope`` / ``mme`` (the reply read as yes/no by
    that benchmark's rule), ``letter`` (the option the reply names, :func:`~unimm.benchmarks.
    scoring.option_letter`) or ``llava-w`` / ``mm-vet`` (a judge model's verdict,
    :mod:`unimm.benchmarks.judged`). ``references`` are each question's right answers (``[]`` on a split
    whose answers are not released: the replies are kept for the benchmark's server).
    """

    name: str
    ids: list[str]
    prompts: list[Item]
    references: list[list[str]]
    grading: str
    groups: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    """Breakdowns: a field name (e.g. ``answer_type``) → each question's value."""
    together: list[str] | None = None
    """Questions that count only when all are right (MME: the two questions of an image; MMBench:
    a question's rotations), reported as ``together_metric``."""
    together_metric: str = "group_accuracy"
    options: list[list[str]] | None = None
    """``letter`` grading: each question's options (A, B, … in order)."""
    max_new_tokens: int = 16
    first_line: bool = True
    """Keep only the reply's first line (short answers); judged benchmarks keep it whole."""
    extras: list[dict] | None = None
    """Per question, what a judge is shown besides the reply (LLaVA-W: the caption)."""
    submission: dict[str, str] | None = None
    """On a split without answers: the submission file's field names, ``{"id": "question_id",
    "answer": "answer"}`` (the question id is written as a number when it is one)."""
    description: str = ""


@dataclasses.dataclass
class BenchmarkData:
    """A loaded benchmark: its tasks, the files read (for the digest) and notes on the handling
    of the release's quirks (printed and kept in the results)."""

    benchmark: str
    root: str
    tasks: list[RankingTask | PairTask | ChoiceTask | AnswerTask]
    files: list[str]
    images: list[str]
    notes: list[str] = dataclasses.field(default_factory=list)
    averages: dict[str, tuple[str, list[str]]] = dataclasses.field(default_factory=dict)
    """Summary figures: a name → (a metric, the tasks whose metric is averaged), e.g. MMEB's
    meta-task averages."""
    totals: dict[str, tuple[str, list[str]]] = dataclasses.field(default_factory=dict)
    """Summed figures: a name → (a metric, the tasks whose metric is summed), e.g. MME's
    perception and cognition scores."""

    def digest(self) -> str:
        """sha256 over the annotation files' bytes and each image's path (relative to the root)
        and size: any change to the annotations or to which images are used changes it, without
        reading every image."""
        h = hashlib.sha256()
        for name in self.files:
            h.update(name.encode() + b"\0")
            with open(name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        for path in sorted(set(self.images)):
            h.update(f"{os.path.relpath(path, self.root)}\0{os.path.getsize(path)}\0".encode())
        return "sha256:" + h.hexdigest()


def sample_of(parts: tuple[tuple[str, str], ...], n: int, context: list | None = None):
    """The sample of an item's parts (images opened now), after ``context`` slices if given."""
    from unimm.data.samples import Sample, Slice

    slices = [Slice.of_text(v) if k == "text" else Slice.of_image(_open(k, v)) for k, v in parts]
    return Sample.of_slices([*(context or []), *slices], key=str(n))


def _open(kind: str, value: str):
    """An image part: a file path, or (``image_base64``) the image's bytes in base64."""
    from unimm.data.adapters import open_image

    if kind != "image_base64":
        return open_image(value)
    import base64
    import io

    from PIL import Image, ImageOps

    from unimm.data.images import to_rgb

    try:
        with Image.open(io.BytesIO(base64.b64decode(value))) as img:
            return to_rgb(ImageOps.exif_transpose(img))  # a copy: usable once the file is closed
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UnimmError(f"an inline (base64) image cannot be read ({exc})") from None


# ---------------------------------------------------------------------------------------------
# Helpers for loaders


def find_file(root: Path, names: Sequence[str], benchmark: str, expected: str) -> Path:
    """``root`` itself when it is one of ``names``, else the first ``root/name`` (names may hold
    folders) that exists.

    Raises:
        UnimmError: saying what the benchmark expects and what the folder holds.
    """
    if root.is_file():
        if root.name in {Path(n).name for n in names}:
            return root
        raise UnimmError(f"{root}: not the {benchmark} benchmark; expected {expected}")
    if not root.is_dir():
        raise UnimmError(f"{root}: no such file or folder (the {benchmark} benchmark: {expected})")
    for name in names:
        if (root / name).is_file():
            return root / name
    raise UnimmError(f"{root}: not the {benchmark} benchmark; expected {expected}, found {listing(root)}")


def find_split_file(
    root: Path, split: str, names: dict[str, list[str]], benchmark: str, expected: str
) -> Path:
    """:func:`find_file` of ``names[split]``; when only another split's file is there, the error
    says which ``--split`` to use."""
    try:
        return find_file(root, names[split], benchmark, expected)
    except UnimmError:
        for other, candidates in names.items():
            if other != split and any((root / n).is_file() or root.name == Path(n).name for n in candidates):
                raise UnimmError(
                    f"{root}: no {names[split][0]} (the {split} split), but {Path(candidates[0]).name}: "
                    f"use --split {other}"
                ) from None
        raise


def listing(folder: Path, most: int = 8) -> str:
    """A short description of a folder's top-level entries, for errors."""
    try:
        entries = sorted(os.listdir(folder))
    except OSError as exc:
        return f"an unreadable folder ({exc.strerror})"
    if not entries:
        return "an empty folder"
    shown = [e + ("/" if (folder / e).is_dir() else "") for e in entries[:most]]
    more = f" and {len(entries) - most} more" if len(entries) > most else ""
    return ", ".join(shown) + more


def read_json(path: Path) -> Any:
    """A JSON file, or an error naming the file and the line of the problem."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise UnimmError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise UnimmError(f"{path}: not UTF-8 text ({exc.reason})") from None


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` of each non-blank line of a JSON Lines file."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UnimmError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise UnimmError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
                rows.append((number, obj))
    except UnicodeDecodeError as exc:
        raise UnimmError(f"{path}: not UTF-8 text ({exc.reason})") from None
    return rows


def objects_of(
    items: Iterable[tuple[Any, Any]], where: Callable[[Any], str]
) -> Iterator[tuple[Any, str, dict]]:
    """``(key, where(key), obj)`` of each ``(key, value)``, refusing a value that is not a JSON object."""
    for key, value in items:
        if not isinstance(value, dict):
            raise UnimmError(f"{where(key)}: not an object")
        yield key, where(key), value


def field(obj: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``obj[key]`` of the given type, or an error naming ``where`` (file:line) and the key."""
    value = obj.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        got = "missing" if key not in obj else f"a {type(value).__name__}"
        raise UnimmError(f"{where}: field {key!r} should be a {names}, is {got}")
    return value


class ImageFinder:
    """Finds a benchmark's image files under a root, trying the folders a release may extract to
    and, for names written without one, the usual extensions; collects what is missing so one
    error names them all."""

    EXTENSIONS = ("", ".jpg", ".jpeg", ".png", ".JPEG", ".JPG", ".PNG", ".gif")

    def __init__(self, root: Path, folders: Sequence[str], benchmark: str) -> None:
        self.root = Path(os.path.realpath(root))
        self.folders = [f for f in folders if (self.root / f).is_dir()] or [""]
        self.benchmark = benchmark
        self.missing: list[str] = []
        self.seen: dict[tuple[str, str | None], str | None] = {}

    def __call__(self, name: str, folder: str | None = None) -> str | None:
        """The real path of ``name`` (in ``folder`` when given, else in the first of the finder's
        folders that has it); ``None``, noted as missing, when there is none."""
        if (name, folder) not in self.seen:
            self.seen[name, folder] = self._find(name, folder)
        return self.seen[name, folder]

    def _find(self, name: str, folder: str | None) -> str | None:
        from unimm.data.images import ImageProblem, resolve_image_path

        for base in [folder] if folder is not None else self.folders:
            for ext in self.EXTENSIONS:
                candidate = os.path.join(base, name + ext) if base else name + ext
                if os.path.isfile(self.root / candidate):
                    try:
                        return str(resolve_image_path(candidate, self.root))
                    except ImageProblem as exc:
                        raise UnimmError(f"{self.benchmark}: {exc}") from None
        self.missing.append(os.path.join(folder or self.folders[0], name))
        return None

    def check(self) -> None:
        """Raise naming the missing images (the first few, and how many)."""
        if not self.missing:
            return
        shown = ", ".join(self.missing[:5])
        more = f" and {len(self.missing) - 5} more" if len(self.missing) > 5 else ""
        raise UnimmError(
            f"{self.benchmark}: {len(self.missing)} image(s) not found under {self.root}: {shown}{more}. "
            "Point --image-root at the folder the release's images were extracted to."
        )
