"""Winoground (Thrush et al., 2022): text, image and group scores (``winoground``).

The release (Hugging Face ``facebook/winoground``, its ``data/`` folder)::

    examples.jsonl   {"id": 0, "image_0": "ex_0_img_0", "image_1": "ex_0_img_1",
                      "caption_0": "an old person kisses a young person", "caption_1": "…",
                      "tag": "Noun", "secondary_tag": "", "num_main_preds": 1,
                      "collapsed_tag": "Object"}
    images/          ex_0_img_0.png, …

Image names are written without their extension (``.png`` in the release; ``.jpg``/``.jpeg``
are accepted too). Caption c belongs to image c. Scores from the cosine of the caption and image
embeddings: text (each image prefers its caption), image (each caption prefers its image), group
(both), overall and per ``collapsed_tag`` (Object, Relation, Both) and per ``num_main_preds``.
"""

from __future__ import annotations

from pathlib import Path

from unimm.benchmarks.base import BenchmarkData, ImageFinder, Item, PairTask, field, find_file, read_jsonl
from unimm.errors import UnimmError

SPLITS = ("test",)
USUAL_EXAMPLES = 400


def load(benchmark, path: Path, *, image_root: Path | None, limit: int, split: str = "test") -> BenchmarkData:
    """``examples.jsonl`` and its images as one pair task."""
    file = find_file(path, ["examples.jsonl", "data/examples.jsonl"], benchmark.name, benchmark.expects)
    rows = read_jsonl(file)
    if not rows:
        raise UnimmError(f"{file}: no example")
    notes = []
    if limit:
        rows = rows[:limit]
        notes.append(f"--limit {limit}: {len(rows)} of the examples; not comparable to published figures")
    elif len(rows) != USUAL_EXAMPLES:
        notes.append(f"{len(rows)} examples, not the release's {USUAL_EXAMPLES}")
    finder = ImageFinder(image_root or file.parent, ["images", ""], benchmark.name)
    ids, captions, images = [], [], []
    tags: list[str] = []
    predicates: list[str] = []
    for line, row in rows:
        where = f"{file}:{line}"
        example = str(field(row, "id", (int, str), where))
        ids.append(example)
        captions.append(
            tuple(
                Item.text(f"{example}:caption_{c}", field(row, f"caption_{c}", str, where).strip())
                for c in (0, 1)
            )
        )
        found = [finder(field(row, f"image_{i}", str, where)) for i in (0, 1)]
        images.append(tuple(Item.image(f"{example}:image_{i}", found[i] or "") for i in (0, 1)))
        tags.append(str(row.get("collapsed_tag", "")))
        predicates.append(str(row.get("num_main_preds", "")))
    finder.check()
    if len(set(ids)) != len(ids):
        raise UnimmError(f"{file}: example ids repeat")
    groups = {
        name: values
        for name, values in (("collapsed_tag", tags), ("num_main_preds", predicates))
        if any(values)
    }
    return BenchmarkData(
        benchmark=benchmark.name,
        root=str(finder.root),
        tasks=[PairTask("winoground", ids, captions, images, groups)],
        files=[str(file)],
        images=[i.parts[0][1] for pair in images for i in pair],
        notes=notes,
    )
