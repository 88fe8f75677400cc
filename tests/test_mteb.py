"""A unimm checkpoint under mteb itself: its mock task grid (text, image, image–text tasks) runs
offline, and on a local text→image task mteb's scores equal ``unimm eval``'s ranking."""

from __future__ import annotations

from pathlib import Path

import mteb  # a dev dependency: missing, these tests fail rather than skip
import pytest

from tests.helpers import make_image

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 200, 20), (160, 40, 200), (20, 190, 200)]
WORDS = ["red", "green", "blue", "yellow", "purple", "cyan"]


def test_mteb_runs_its_mock_tasks_on_a_unimm_checkpoint(trained):
    from mteb.mocks.mock_run import mock_run

    from unimm.benchmarks.mteb_encoder import UnimmEncoder

    checkpoint, _ = trained
    model = UnimmEncoder(checkpoint, device="cpu")
    assert model.mteb_model_meta.embed_dim == 64 and model.mteb_model_meta.modalities == ["text", "image"]
    results = mock_run(model)
    failed = {name: str(r) for name, r in results.items() if r is not None and not hasattr(r, "scores")}
    assert not failed
    ran = {name for name, r in results.items() if r is not None}
    # text tasks (MTEB) and image / image-text tasks (MIEB) all ran
    assert {"MockRetrievalTask", "MockSTSTask", "MockAny2AnyRetrievalT2I", "MockImageClassification"} <= ran


def local_t2i_task(images: list[Path], captions: list[str]):
    """A small text→image retrieval task held in memory, built as mteb's own tasks are."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata
    from PIL import Image

    class LocalT2I(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name="UnimmLocalT2I",
            description="Captions retrieving their generated images (a unimm test).",
            reference="https://github.com/embeddings-benchmark/mteb",
            dataset={"path": "NA", "revision": "NA"},
            type="Any2AnyRetrieval",
            category="t2i",
            modalities=["image", "text"],
            eval_splits=["test"],
            eval_langs=["eng-Latn"],
            main_score="ndcg_at_10",
            date=("2026-01-01", "2026-01-01"),
            domains=[],
            task_subtypes=[],
            license="cc-by-4.0",
            annotations_creators="derived",
            dialect=[],
            sample_creation="created",
            bibtex_citation="",
        )

        def load_data(self, num_proc=None, **kwargs):
            split = RetrievalSplitData(
                queries=Dataset.from_dict({"id": [f"q{i}" for i in range(len(captions))], "text": captions}),
                corpus=Dataset.from_dict(
                    {"id": [f"d{i}" for i in range(len(images))], "image": [Image.open(p) for p in images]}
                ),
                relevant_docs={f"q{i}": {f"d{i % len(images)}": 1} for i in range(len(captions))},
                top_ranked=None,
            )
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return LocalT2I()


def test_mteb_scores_equal_unimm_eval_on_the_same_data(trained, tmp_path):
    from unimm.benchmarks.base import Item, RankingTask
    from unimm.benchmarks.mteb_encoder import UnimmEncoder
    from unimm.benchmarks.run import ItemEncoder, rank_task

    checkpoint, _ = trained
    images = [make_image(tmp_path / f"{i}.png", colour=COLOURS[i], fmt="PNG") for i in range(6)]
    captions = [f"a {WORDS[i % 6]} square, picture {i}" for i in range(12)]
    model = UnimmEncoder(checkpoint, device="cpu", batch_size=4)
    result = mteb.evaluate(model, [local_t2i_task(images, captions)], cache=None, show_progress_bar=False)
    theirs = result.task_results[0].scores["test"][0]

    task = RankingTask(
        "t2i",
        [Item.text(f"q{i}", c) for i, c in enumerate(captions)],
        [Item.image(f"d{i}", p) for i, p in enumerate(images)],
        [[f"d{i % 6}"] for i in range(12)],
    )
    ours = rank_task(ItemEncoder(model.session, 4), task)["metrics"]
    for k in (1, 5):
        assert ours[f"R@{k}"] == pytest.approx(theirs[f"recall_at_{k}"], abs=6e-6), (
            k
        )  # mteb rounds to 5 decimals
    assert ours["MRR"] == pytest.approx(theirs["mrr_at_10"], abs=6e-6)  # gallery of 6: MRR@10 = MRR


def test_prompts_follow_mteb_priority(trained):
    from mteb.types import PromptType

    from unimm.benchmarks.mteb_encoder import UnimmEncoder

    checkpoint, _ = trained
    model = UnimmEncoder(
        checkpoint,
        device="cpu",
        prompts={"T-query": "Find an image for this caption", "Any2AnyRetrieval": "x", "document": "doc"},
    )

    class Meta:
        name, type = "T", "Any2AnyRetrieval"

    assert model._instruction(Meta, PromptType.query) == "Find an image for this caption"
    assert model._instruction(Meta, PromptType.document) == "x"  # task type before prompt type
    assert UnimmEncoder(checkpoint, device="cpu")._instruction(Meta, PromptType.query) == ""
