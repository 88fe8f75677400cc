"""``unimm eval``: every metric against hand-computed values, task selection, and the model calls."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from unimm.data.samples import Sample, Slice
from unimm.inference.metrics import (
    choice_scores,
    exact_match,
    normalize_answer,
    ranking_scores,
    winoground_scores,
)


def test_normalize_and_exact_match():
    assert normalize_answer(" Two.") == "two"
    assert normalize_answer("The  Red, circle!") == "the red circle"
    assert exact_match(["Two.", "red", "on the LEFT"], ["two", "blue", "on the left"]) == pytest.approx(2 / 3)
    assert math.isnan(exact_match([], []))
    with pytest.raises(ValueError, match="2 predictions for 1"):
        exact_match(["a", "b"], ["a"])


def test_choice_scores_by_hand():
    got = choice_scores([True, False, True, True, False], ["p1", "p1", "p2", "p2", None])
    assert got["accuracy"] == pytest.approx(3 / 5)
    assert got["group_accuracy"] == pytest.approx(1 / 2)  # p2 both right, p1 not
    assert (got["questions"], got["groups"]) == (5, 2)


def test_ranking_scores_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    got = ranking_scores(scores, [{2}, {0, 1}], ks=(1, 2))
    # query 0 ranks [0, 2, 1]: first relevant at rank 2; query 1 ranks [1, 0, 2]: rank 1
    assert got["R@1"] == pytest.approx(0.5) and got["R@2"] == pytest.approx(1.0)
    assert got["MRR"] == pytest.approx((1 / 2 + 1) / 2)
    assert got["chance@1"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    tie = ranking_scores(torch.tensor([[1.0, 1.0]]), [{1}], ks=(1,))
    assert tie["R@1"] == 0.0  # ties keep column order: no credit for an undecided model
    with pytest.raises(ValueError, match="at least one relevant"):
        ranking_scores(scores, [{0}, set()])


def test_ranking_scores_agree_with_the_qrels_metrics():
    """One relevant item per query: Recall@k and MRR equal `unimm retrieve`'s qrels metrics."""
    from unimm.inference.search import metrics

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(40, 30, generator=gen)
    gold = torch.randint(0, 30, (40,), generator=gen)
    ours = ranking_scores(scores, [{int(g)} for g in gold], ks=(1, 5, 10))
    order = torch.argsort(-scores, dim=1, stable=True)
    ranked = {str(q): [str(int(c)) for c in order[q]] for q in range(40)}
    qrels = {str(q): {str(int(gold[q])): 1.0} for q in range(40)}
    theirs = metrics(ranked, qrels)
    for k in (1, 5, 10):
        assert ours[f"R@{k}"] == pytest.approx(theirs[f"recall@{k}"])
    assert ours["MRR"] == pytest.approx(theirs["mrr"])


def test_winoground_scores_by_hand():
    sims = torch.tensor(
        [
            [[0.9, 0.1], [0.2, 0.8]],  # every preference right
            [
                [0.5, 0.6],
                [0.4, 0.3],
            ],  # text: image 1 prefers caption 0 (0.6 > 0.3); image: caption 0 prefers image 1
            [[0.5, 0.4], [0.6, 0.7]],  # text: image 0 prefers caption 1; image: both captions right
        ]
    )
    got = winoground_scores(sims)
    assert got["text"] == pytest.approx(1 / 3)
    assert got["image"] == pytest.approx(2 / 3)
    assert got["group"] == pytest.approx(1 / 3)
    assert got["pairs"] == 3


def _sample(sid, kinds, response=None, meta=None):
    slices = [
        Slice.of_text(f"{sid} text {n}") if k == "text" else Slice.of_image(f"{sid}/{n}")
        for n, k in enumerate(kinds)
    ]
    return Sample(key=sid, slices=slices, id=sid, response=response, meta=meta)


def test_build_tasks_reads_the_record_shapes():
    from unimm.inference.evaluate import build_tasks

    samples = [
        _sample("qa", ["image", "text"], response="red"),
        _sample("choice", ["image", "text"], response="red", meta={"choices": ["blue", "red"], "pair": "p"}),
        _sample("cap", ["image", "text"]),
        _sample("textfirst", ["text", "image"]),
        _sample("wino-a", ["image", "text"], meta={"pair": "w"}),
        _sample("wino-b", ["image", "text"], meta={"pair": "w"}),
        _sample("lonely", ["image", "text"], meta={"pair": "x"}),
        _sample("story", ["text", "text", "image", "text", "image"]),
        _sample("one-image-story", ["text", "image", "text"]),
        _sample("bad-choice", ["image", "text"], response="green", meta={"choices": ["blue", "red"]}),
    ]
    tasks = build_tasks(samples)
    assert tasks["qa"] == [0, 9]  # an answer outside its choices is an open question
    assert tasks["two_choice"] == [1]
    assert tasks["captioning"] == [2, 4, 5, 6]  # image first, then its text
    assert tasks["retrieval"] == [2, 3, 4, 5, 6]
    assert tasks["interleaved"] == [(7, 4)]
    assert tasks["winoground"] == [(4, 5)]


def test_relevance_by_equal_text():
    from unimm.inference.evaluate import relevant_by_text

    assert relevant_by_text(["Two red", "blue", "two red."]) == [{0, 2}, {1}, {0, 2}]


class _OracleEvaluator:
    """Embeds each input as the one-hot vector of the scene it shows (text: its caption; image:
    the caption of the record it came from), so every retrieval task must score 1.0 if the
    queries, galleries and relevance are wired right."""

    def __init__(self, samples):
        self.caption_of_image = {}
        for s in samples:
            texts = s.texts()
            images = [x for x in s.slices if x.kind == "image"]
            if s.meta["kind"] == "story":
                captions = [t.split(", ", 1)[1].rstrip(".") for t in texts[1:]]
            else:
                captions = [s.meta["caption"]] * len(images)
            for image, caption in zip(images, captions, strict=True):
                self.caption_of_image[id(image.image)] = caption
        self.vocab: dict[str, int] = {}

    def _caption(self, slices):
        last = slices[-1]
        if last.kind == "image":
            return self.caption_of_image[id(last.image)]
        text = last.text
        return text.split(", ", 1)[1].rstrip(".") if ", " in text else text

    def embed(self, slice_lists):
        rows = [self.vocab.setdefault(self._caption(s), len(self.vocab)) for s in slice_lists]
        return torch.nn.functional.one_hot(torch.tensor(rows), 4096).float()


def test_retrieval_wiring_with_an_oracle(tmp_path):
    from unimm.config import EvalOptions
    from unimm.data.synthetic import write_synthetic
    from unimm.inference.evaluate import evaluate, load_samples

    samples = load_samples([str(write_synthetic(tmp_path, 120, seed=2))])
    opts = EvalOptions(model="oracle", data=["x"], tasks=["retrieval", "interleaved", "winoground"])
    got = evaluate(_OracleEvaluator(samples), samples, opts)
    assert got["text_to_image"]["R@1"] == 1.0 and got["image_to_text"]["R@1"] == 1.0
    assert got["interleaved"]["R@1"] == 1.0 and got["interleaved"]["queries"] >= 5
    assert got["winoground"] == {"text": 1.0, "image": 1.0, "group": 1.0, "pairs": got["winoground"]["pairs"]}
    assert got["winoground"]["pairs"] >= 5


def test_evaluator_calls_match_direct_model_calls(trained, tmp_path):
    """Batched left-padded generation equals one-at-a-time; option log-probabilities equal the
    model's own loss; the JSON output is strict and the table lists the tasks."""
    from unimm.commands.eval import run
    from unimm.config import EvalConfig, EvalOptions
    from unimm.data.synthetic import write_synthetic
    from unimm.inference.evaluate import Evaluator, build_tasks, format_table, load_samples

    checkpoint, _ = trained
    data = write_synthetic(tmp_path / "d", 40, seed=4)
    samples = load_samples([str(data)])
    ev = Evaluator.load(checkpoint, "cpu", batch_size=4)
    tasks = build_tasks(samples)
    prompts = [samples[i] for i in tasks["qa"][:5]]
    batched = ev.generate(prompts, after="assistant", max_new_tokens=6)
    ev.batch_size = 1
    single = ev.generate(prompts, after="assistant", max_new_tokens=6)
    assert batched == single

    sample = samples[tasks["two_choice"][0]]
    options = [sample.replace(response=c) for c in sample.meta["choices"]]
    logprobs = ev.answer_logprobs(options)
    for option, lp in zip(options, logprobs, strict=True):
        batch = ev.collator([option])
        out = ev.model(batch, with_views=False)
        assert lp.item() == pytest.approx(-out.loss_gen.item() * out.label_tokens, rel=1e-4)

    out = tmp_path / "eval.json"
    results = run(
        EvalConfig(EvalOptions(model=str(checkpoint), data=[str(data)], out=str(out), device="cpu")),
        progress=False,
    )
    stored = json.loads(out.read_text())
    assert stored["samples"] == 40 and "NaN" not in out.read_text()
    for key in (
        "qa",
        "captioning",
        "two_choice",
        "text_to_image",
        "image_to_text",
        "interleaved",
        "winoground",
    ):
        assert key in results, key
    questions = results["two_choice"]["questions"]
    assert abs(results["two_choice"]["answer_first"] - 0.5) <= 1 / questions  # balanced by construction
    table = format_table(results)
    assert "text→image R@1" in table and "Winoground group" in table


def test_eval_reports_tasks_the_data_cannot_serve(trained, tmp_path):
    from unimm.commands.eval import run
    from unimm.config import EvalConfig, EvalOptions

    checkpoint, _ = trained
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "t", "slices": [{"text": "just text"}]}) + "\n")
    results = run(
        EvalConfig(EvalOptions(model=str(checkpoint), data=[str(tmp_path / "d.jsonl")])), progress=False
    )
    assert set(results["skipped"]) == {
        "qa",
        "captioning",
        "two_choice",
        "retrieval",
        "interleaved",
        "winoground",
    }


def test_ablation_table_and_verdict_by_hand():
    from unimm.pipelines.ablate import COLUMNS, format_markdown, verdict

    columns = [c for c, _, _ in COLUMNS]
    joint = dict.fromkeys(columns, 0.5)
    worse = dict.fromkeys(columns, 0.4) | {"QA EM": 0.6}
    missing = dict.fromkeys(columns, None)
    rows = {"joint": joint, "generative-only": worse, "discriminative-only": missing}
    table = format_markdown(rows)
    assert table.splitlines()[0].startswith("| variant | QA EM |")
    # each cell of a variant with its relative change against the full method, as the paper prints it
    assert "| generative-only | 0.600 (+20.0%) | 0.400 (-20.0%) |" in table
    assert "| discriminative-only | – |" in table and "| joint | 0.500 | 0.500 |" in table
    assert verdict(rows) == [
        f"- joint ≥ generative-only on {len(columns) - 1} of {len(columns)} columns (below on: QA EM)"
    ]


def test_ablate_trains_each_variant_once(tiny_shards, tmp_path):
    from tests.test_benchmarks_generative import pope
    from unimm.data.synthetic import write_synthetic
    from unimm.pipelines.ablate import AblateOptions, run

    recipe = Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml"
    opts = AblateOptions(
        recipe=str(recipe),
        train=[str(tiny_shards)],
        eval=[str(write_synthetic(tmp_path / "e", 30, seed=5))],
        steps=3,
        out=str(tmp_path / "abl"),
        variants=["joint", "w/o data_g", "w/o avg pooling"],
        benchmarks={"pope": str(pope(tmp_path / "pope"))},
    )
    summary = run(opts, progress=False)
    assert list(summary["rows"]) == ["joint", "w/o data_g", "w/o avg pooling"]
    assert all(v is not None for v in summary["rows"]["joint"].values())
    stored = json.loads((tmp_path / "abl" / "joint" / "seed-0" / "eval.json").read_text())
    pope_accuracy = stored["benchmarks"]["pope"]["metrics"]["averages"]["accuracy"]["accuracy"]
    assert summary["rows"]["joint"]["pope accuracy"] == pytest.approx(pope_accuracy)
    # the data-reduction row trained on the stated share: 3 steps of 8 = the 24 samples once, all
    # tagged "both"; half of them (by key) kept their next-token loss, the rest only the alignment loss
    (joint,), (reduced,) = summary["samples"]["joint"], summary["samples"]["w/o data_g"]
    assert joint == {"both": 24, "generative": 0, "discriminative": 0}
    assert reduced["both"] + reduced["discriminative"] == 24 and 6 <= reduced["discriminative"] <= 18
    row = next(line for line in summary["table"].splitlines() if line.startswith("| w/o data_g |"))
    assert "%)" in row and "w/o data_g: " in summary["table"]  # the relative changes; the samples
    from unimm.model.checkpoint import read_meta

    assert read_meta(tmp_path / "abl" / "without-avg-pooling" / "seed-0" / "step-000003")["pooling"] == "last"
    for name in ("ablation.md", "ablation.json", "ablation.png", "loss.png"):
        assert (tmp_path / "abl" / name).stat().st_size > 0
    stored = tmp_path / "abl" / "joint" / "seed-0" / "eval.json"
    before = stored.stat().st_mtime_ns
    again = run(opts, progress=False)  # finished variants are reused, not retrained
    assert stored.stat().st_mtime_ns == before and again["rows"] == summary["rows"]


def test_ablation_over_seeds_reports_mean_and_spread():
    from unimm.pipelines.ablate import COLUMNS, _aggregate, format_markdown

    columns = [c for c, _, _ in COLUMNS]
    seeds = [dict.fromkeys(columns, 0.2), dict.fromkeys(columns, 0.4) | {"QA EM": None}]
    import statistics

    mean = _aggregate(seeds, statistics.fmean)
    std = _aggregate(seeds, statistics.stdev)
    assert mean["t→i R@1"] == pytest.approx(0.3) and std["t→i R@1"] == pytest.approx(0.1414, abs=1e-4)
    assert mean["QA EM"] is None  # a seed without the value leaves the cell empty
    table = format_markdown({"joint": mean}, {"joint": std})
    assert "| joint | – | 0.300 ± 0.141 |" in table
