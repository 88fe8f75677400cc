"""The field's benchmarks, read from their official release files (``unimm eval --benchmark``).

One module per benchmark (or family of one layout) turns the release's files into the plain
tasks of :mod:`unimm.benchmarks.base`; :mod:`unimm.benchmarks.run` embeds and scores them with
the pure metrics of :mod:`unimm.inference.metrics`. This registry names each benchmark, the files
it expects (for ``unimm eval --list`` and for the error on a folder that is something else) and
its loader; loaders import lazily, so listing costs nothing.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

from unimm.benchmarks.base import BenchmarkData
from unimm.errors import UnimmError


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A registered benchmark: its name, what it measures, the files it reads, its loader."""

    name: str
    title: str
    expects: str
    module: str

    def load(
        self, path: Path, *, image_root: Path | None = None, limit: int = 0, split: str = "test"
    ) -> BenchmarkData:
        """Read the release at ``path`` (its folder, or its annotation file) into tasks; images are
        looked up under ``image_root`` (default: where the release keeps them). ``limit``: the
        first N examples only (0 = all). ``split``: which of the release's splits (``test``, the
        published figures; ``val`` where the release has one, for choosing checkpoints)."""
        loader = importlib.import_module(self.module)
        if split not in loader.SPLITS:
            raise UnimmError(
                f"{self.name}: no {split!r} split (it has {', '.join(loader.SPLITS)}); choosing "
                "checkpoints on a test split makes its figures optimistic"
            )
        return loader.load(self, Path(path), image_root=image_root, limit=limit, split=split)


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "coco",
            "MSCOCO 5k test (Karpathy split): text→image and image→text R@1/5/10",
            "dataset_coco.json (Karpathy split) with the val2014/ (and train2014/) image folders",
            "unimm.benchmarks.karpathy",
        ),
        Benchmark(
            "flickr30k",
            "Flickr30k 1k test (Karpathy split): text→image and image→text R@1/5/10",
            "dataset_flickr30k.json (Karpathy split) with the flickr30k-images/ folder",
            "unimm.benchmarks.karpathy",
        ),
        Benchmark(
            "winoground",
            "Winoground: text, image and group scores over 400 examples",
            "examples.jsonl with the images/ folder (the Hugging Face facebook/winoground data/ folder)",
            "unimm.benchmarks.winoground",
        ),
        Benchmark(
            "vist",
            "VIST (FROMAGe's protocol): a story's last image from its 5 captions (and 4 images), R@1/5/10",
            "sis/<split>.story-in-sequence.json with the photos in images/<split>/ (or <split>_images/)",
            "unimm.benchmarks.vist",
        ),
        Benchmark(
            "mmeb",
            "MMEB: P@1 on 36 tasks, the classification / VQA / retrieval / grounding averages, overall",
            "task folders <Task>/test-00000-of-00001.parquet with eval_images/ (TIGER-Lab/MMEB-eval)",
            "unimm.benchmarks.mmeb",
        ),
        Benchmark(
            "mmvp",
            "MMVP: 300 questions in 150 pairs about CLIP-blind images; pair accuracy (likeliest option)",
            "Questions.csv with the MMVP Images/ folder (Hugging Face MMVP/MMVP)",
            "unimm.benchmarks.mmvp",
        ),
        Benchmark(
            "mmvp-vlm",
            "MMVP-VLM: 135 statement pairs in 9 visual patterns; pair accuracy, by pattern",
            "Questions.csv with the MLLM_VLM Images/<Type>/ folders (Hugging Face MMVP/MMVP_VLM)",
            "unimm.benchmarks.mmvp",
        ),
    )
}


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark ``name``.

    Raises:
        UnimmError: naming the known benchmarks.
    """
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise UnimmError(
            f"--benchmark {name!r}: unknown; known: {', '.join(BENCHMARKS)} (unimm eval --list)"
        ) from None


def format_list() -> str:
    """The registry as ``unimm eval --list`` prints it."""
    width = max(len(n) for n in BENCHMARKS)
    lines = []
    for b in BENCHMARKS.values():
        lines.append(f"{b.name:<{width}}  {b.title}")
        lines.append(f"{'':<{width}}  reads: {b.expects}")
    return "\n".join(lines)
