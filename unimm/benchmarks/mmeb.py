"""MMEB (Jiang et al., VLM2Vec, 2024): 36 image embedding tasks in four meta-tasks (``mmeb``).

The evaluation release (Hugging Face ``TIGER-Lab/MMEB-eval``), as its own loader reads it::

    ImageNet-1K/test-00000-of-00001.parquet
        qry_text      "<|image_1|>\\nRepresent the given image for classification"
        qry_img_path  "ImageNet-1K/ILSVRC2012_val_00000001.JPEG"
        tgt_text      ["tench", "goldfish", …]   (the candidates; the first is the positive)
        tgt_img_path  ["", "", …]
    …one folder a task…
    eval_images/                              (images.zip extracted) ImageNet-1K/…, …

The task instructions are part of ``qry_text`` / ``tgt_text`` as published and are used as they
are; the image placeholder ``<|image_1|>`` (Phi-3-V's, which the release writes) marks where the
image goes and is removed from the text; an empty image path means a text-only side. Each query
is ranked against its own candidate list only; the score is precision@1 (the positive, candidate
0, ranked first). Figures: P@1 per task, the averages of the four meta-tasks (classification,
VQA, retrieval, visual grounding), of the in-distribution (20) and out-of-distribution (16)
tasks, and overall — over the tasks present; a folder holding only some tasks is scored on those
(noted), so point ``--data`` at a folder of a few task folders for a subset.

Handling of the release's quirks: repeated candidates in a list (identical text and image) are
one candidate; an unknown task folder is scored and left out of the meta-task averages (noted);
missing images are an error naming them; images are looked for under ``eval_images/`` and then
the root.
"""

from __future__ import annotations

from pathlib import Path

from unimm.benchmarks.base import BenchmarkData, ImageFinder, Item, RankingTask, listing
from unimm.errors import UnimmError

SPLITS = ("test",)
IMAGE_TOKEN = "<|image_1|>"
COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")

META_TASKS: dict[str, tuple[str, ...]] = {
    "classification": (
        "ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397",
        "Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211",
    ),
    "vqa": (
        "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA",
        "Visual7W", "ScienceQA", "VizWiz", "GQA", "TextVQA",
    ),
    "retrieval": (
        "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t",
        "NIGHTS", "WebQA", "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS",
    ),
    "grounding": ("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"),
}  # fmt: skip
"""The 36 tasks of each meta-task, as the VLM2Vec paper's Table 1 groups them."""

OUT_OF_DISTRIBUTION = frozenset(
    {
        "Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211",
        "ScienceQA", "VizWiz", "GQA", "TextVQA",
        "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS",
        "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing",
    }
)  # fmt: skip
"""The 16 tasks held out of MMEB's training set (the other 20 are in-distribution)."""

TASK_COUNT = sum(len(t) for t in META_TASKS.values())


def _task_files(root: Path) -> dict[str, Path]:
    """Task name → its test parquet file: ``root/<Task>/test-*.parquet`` (or ``root`` one task)."""

    def test_file(folder: Path) -> Path | None:
        files = sorted(folder.glob("test-*.parquet"))
        return files[0] if files else None

    if root.is_file():
        if root.suffix == ".parquet":
            return {root.parent.name: root}
        raise UnimmError(
            f"{root}: not the mmeb benchmark; expected a <Task>/test-00000-of-00001.parquet file"
        )
    if not root.is_dir():
        raise UnimmError(f"{root}: no such file or folder (the mmeb benchmark)")
    if test_file(root):
        return {root.name: test_file(root)}
    found = {d.name: test_file(d) for d in sorted(root.iterdir()) if d.is_dir()}
    found = {name: f for name, f in found.items() if f is not None}
    if not found:
        raise UnimmError(
            f"{root}: not the mmeb benchmark; expected task folders holding test-00000-of-00001.parquet "
            f"(TIGER-Lab/MMEB-eval: ImageNet-1K/, MSCOCO_t2i/, …) and eval_images/, found {listing(root)}"
        )
    return found


def _read_parquet(file: Path) -> dict[str, list]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UnimmError("mmeb reads Parquet files: pip install 'unimm[benchmarks]' (pyarrow)") from None
    try:
        table = pq.read_table(file)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError subclasses for a bad file
        raise UnimmError(f"{file}: not a readable Parquet file ({exc})") from None
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise UnimmError(
            f"{file}: no column {', '.join(missing)} (it has {', '.join(table.column_names)}; "
            f"the MMEB evaluation files have {', '.join(COLUMNS)})"
        )
    return {c: table.column(c).to_pylist() for c in COLUMNS}


def load(benchmark, path: Path, *, image_root: Path | None, limit: int, split: str = "test") -> BenchmarkData:
    """Each task folder as one ranking task over per-query candidate lists (module docstring)."""
    files = _task_files(path)
    root = path if path.is_dir() and len(files) > 1 else next(iter(files.values())).parent.parent
    finder = ImageFinder(image_root or root, ["eval_images", ""], benchmark.name)
    known = {t for tasks in META_TASKS.values() for t in tasks}
    notes = []
    unknown = [t for t in files if t not in known]
    if unknown:
        notes.append(f"not MMEB tasks, left out of the averages: {', '.join(unknown)}")
    if len(files) - len(unknown) < TASK_COUNT:
        notes.append(
            f"{len(files) - len(unknown)} of the {TASK_COUNT} tasks; averages are over those present"
        )
    if limit:
        notes.append(f"--limit {limit}: the first {limit} queries of each task; not comparable")
    tasks = [_task(name, file, finder, limit) for name, file in files.items()]
    finder.check()
    present = [t for t in files if t in known]
    averages = {meta: [t for t in names if t in files] for meta, names in META_TASKS.items()}
    averages["in_distribution"] = [t for t in present if t not in OUT_OF_DISTRIBUTION]
    averages["out_of_distribution"] = [t for t in present if t in OUT_OF_DISTRIBUTION]
    averages["overall"] = present
    images = [p for t in tasks for item in (*t.queries, *t.gallery) for k, p in item.parts if k == "image"]
    return BenchmarkData(
        benchmark=benchmark.name,
        root=str(finder.root),
        tasks=tasks,
        files=[str(f) for f in files.values()],
        images=images,
        notes=notes,
        averages={name: ("P@1", tasks) for name, tasks in averages.items() if tasks},
    )


def _task(name: str, file: Path, finder: ImageFinder, limit: int) -> RankingTask:
    columns = _read_parquet(file)
    rows = len(columns["qry_text"])
    if not rows:
        raise UnimmError(f"{file}: no query")
    if limit:
        rows = min(rows, limit)
    queries, candidates, relevant = [], [], []
    gallery: dict[tuple, str] = {}  # a distinct candidate's parts → its id
    for r in range(rows):
        where = f"{file}: row {r}"
        queries.append(
            _item(f"{name}:q{r}", columns["qry_text"][r], columns["qry_img_path"][r], finder, where)
        )
        texts, paths = columns["tgt_text"][r], columns["tgt_img_path"][r]
        if (
            not isinstance(texts, list)
            or not isinstance(paths, list)
            or len(texts) != len(paths)
            or not texts
        ):
            raise UnimmError(
                f"{where}: tgt_text and tgt_img_path should be lists of one length (the candidates)"
            )
        ids = []
        for text, image in zip(texts, paths, strict=True):
            item = _item("", text, image, finder, f"{where} (a candidate)")
            ids.append(gallery.setdefault(item.parts, f"{name}:c{len(gallery)}"))
        candidates.append(list(dict.fromkeys(ids)))
        relevant.append([ids[0]])
    return RankingTask(
        name,
        queries,
        [Item(gid, parts) for parts, gid in gallery.items()],
        relevant,
        candidates=candidates,
        precision_at_1=True,
    )


def _item(id: str, text: object, image: object, finder: ImageFinder, where: str) -> Item:
    """One side of a query or candidate: its image (at the placeholder, else first) and text."""
    text = text if isinstance(text, str) else ""
    image = image.strip() if isinstance(image, str) else ""
    before, token, after = text.partition(IMAGE_TOKEN)
    if not image:
        if token:
            raise UnimmError(f"{where}: the text holds {IMAGE_TOKEN} but no image path is given")
        if not text.strip():
            raise UnimmError(f"{where}: neither text nor image")
        return Item(id, (("text", text.strip()),))
    lead, rest = (before.strip(), after.strip()) if token else ("", text.strip())
    parts: list[tuple] = [("text", lead)] if lead else []
    parts.append(("image", finder(image) or ""))
    if rest:
        parts.append(("text", rest))
    return Item(id, tuple(parts))
