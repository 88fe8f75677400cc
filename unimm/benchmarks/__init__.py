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
        Benchmark(
            "vqav2",
            "VQAv2: questions about COCO images, the VQA accuracy (val; test-dev: replies for its server)",
            "v2_OpenEnded_mscoco_<split>_questions.json (+ v2_mscoco_val2014_annotations.json), "
            "val2014/ or test2015/",
            "unimm.benchmarks.vqa",
        ),
        Benchmark(
            "gqa",
            "GQA test-dev balanced: compositional questions, exact-match accuracy by structural type",
            "testdev_balanced_questions.json (val: val_balanced_questions.json) with the images/ folder",
            "unimm.benchmarks.vqa",
        ),
        Benchmark(
            "vizwiz",
            "VizWiz-VQA: questions from blind users (answer 'unanswerable' when it is), the VQA accuracy",
            "Annotations/<split>.json with the <split>/ image folder (test: replies for the server)",
            "unimm.benchmarks.vqa",
        ),
        Benchmark(
            "textvqa",
            "TextVQA: questions about text in images, the VQA accuracy (val; test: replies for the server)",
            "TextVQA_0.5.1_<split>.json with train_images/ (val) or test_images/ (test)",
            "unimm.benchmarks.vqa",
        ),
        Benchmark(
            "pope",
            "POPE: object hallucination, yes/no; accuracy, precision, recall, F1, yes ratio per file",
            "coco_pope_{adversarial,popular,random}.json (JSON lines) with the COCO val2014/ images",
            "unimm.benchmarks.yesno",
        ),
        Benchmark(
            "mme",
            "MME: 14 yes/no subtasks; acc, acc+ and score per subtask, perception and cognition totals",
            "MME_Benchmark_release_version/<subtask>/ (images with .txt question files)",
            "unimm.benchmarks.yesno",
        ),
        Benchmark(
            "scienceqa-img",
            "ScienceQA-IMG: multiple choice with an image; accuracy by generation and by likelihood",
            "problems.json and pid_splits.json with images/<split>/<pid>/image.png",
            "unimm.benchmarks.choice",
        ),
        Benchmark(
            "mmbench",
            "MMBench: multiple choice, circular evaluation; by generation and by likelihood, per category",
            "MMBench_DEV_EN.tsv (--split val) or MMBench_TEST_EN.tsv (the OpenCompass TSV, images inline)",
            "unimm.benchmarks.choice",
        ),
        Benchmark(
            "llava-w",
            "LLaVA-Bench (In-the-Wild): 60 open questions, rated by a judge against GPT-4's (--judge URL)",
            "questions.jsonl, context.jsonl, answers_gpt4.jsonl with images/ (llava-bench-in-the-wild)",
            "unimm.benchmarks.judged",
        ),
        Benchmark(
            "mm-vet",
            "MM-Vet: 218 open questions on integrated capabilities, scored 0–1 by a judge (--judge URL)",
            "mm-vet.json with the images/ folder (the MM-Vet release)",
            "unimm.benchmarks.judged",
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
