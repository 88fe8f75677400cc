"""``unimm eval --benchmark``: miniature copies of the releases in their official layouts, every
metric checked against trec_eval (pytrec_eval) or a closed form on independently computed
embeddings, the releases' quirks, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.helpers import make_image
from unimm.cli import app

runner = CliRunner()
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 200, 20), (160, 40, 200), (20, 190, 200)]
WORDS = ["red", "green", "blue", "yellow", "purple", "cyan"]


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def eval_benchmark(name: str, data: Path, checkpoint: Path, out: Path, *extra: str):
    """``unimm eval --benchmark`` on the CPU: its output and the results file it wrote."""
    args = ["--benchmark", name, "--data", str(data), "--model", str(checkpoint), "--out", str(out)]
    result = invoke("eval", *args, "--device", "cpu", *extra)
    assert result.exit_code == 0, result.output
    return result.output, json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------
# Miniature releases


def karpathy(root: Path, name: str) -> Path:
    """A miniature ``dataset_<name>.json`` in Karpathy's layout: 4 test images (one with six
    captions), one each of train, val and restval; raw captions end in spaces as the real ones do."""
    images = []
    for i in range(7):
        split = ["test", "test", "train", "test", "val", "restval", "test"][i]
        filename = f"COCO_val2014_{i:012d}.jpg" if name == "coco" else f"{1000 + i}.jpg"
        folder = root / ("val2014" if name == "coco" else "flickr30k-images")
        make_image(folder / filename, size=(40 + 4 * i, 32 + 2 * i), colour=COLOURS[i % 6])
        captions = 6 if i == 1 else 5
        sentences = [
            {"raw": f"a {WORDS[i % 6]} picture {i} number {k} ", "imgid": i, "sentid": 10 * i + k}
            for k in range(captions)
        ]
        entry = {"filename": filename, "imgid": i, "split": split, "sentences": sentences}
        entry["sentids"] = [s["sentid"] for s in sentences]
        if name == "coco":
            entry.update(filepath="val2014", cocoid=500 + i)
        images.append(entry)
    file = root / f"dataset_{name}.json"
    file.write_text(json.dumps({"images": images, "dataset": name}))
    return file


def winoground(root: Path, examples: int = 4) -> Path:
    """A miniature ``data/`` folder of facebook/winoground: image names without extension."""
    rows = []
    for e in range(examples):
        for i in (0, 1):
            make_image(root / "images" / f"ex_{e}_img_{i}.png", colour=COLOURS[(2 * e + i) % 6], fmt="PNG")
        rows.append(
            {
                "id": e,
                "image_0": f"ex_{e}_img_0",
                "image_1": f"ex_{e}_img_1",
                "caption_0": f"a {WORDS[(2 * e) % 6]} square ",
                "caption_1": f"a {WORDS[(2 * e + 1) % 6]} square",
                "tag": "Noun",
                "secondary_tag": "",
                "num_main_preds": 1 + e % 2,
                "collapsed_tag": ["Object", "Relation"][e % 2],
            }
        )
    (root / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


# ---------------------------------------------------------------------------------------------
# Independent computations


def direct_embeddings(checkpoint: Path, inputs: list[tuple[str, str]]) -> torch.Tensor:
    """Each input embedded on its own, one forward pass apiece, with the session's own call."""
    from unimm.data.adapters import open_image
    from unimm.data.samples import Sample, Slice
    from unimm.inference.session import Session

    session = Session.load(checkpoint, device="cpu")
    rows = []
    for kind, value in inputs:
        piece = Slice.of_text(value) if kind == "text" else Slice.of_image(open_image(value))
        rows.append(session.embed_views([Sample.of_slices([piece])])[0])
    return torch.stack(rows)


def trec(scores: torch.Tensor, query_ids, doc_ids, relevant) -> dict[str, float]:
    """success@1/5/10 and MRR by trec_eval over the full score matrix."""
    import pytrec_eval

    run = {
        q: {d: float(s) for d, s in zip(doc_ids, row, strict=True)}
        for q, row in zip(query_ids, scores, strict=True)
    }
    qrels = {q: {d: 1 for d in rel} for q, rel in zip(query_ids, relevant, strict=True)}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"success.1,5,10", "recip_rank"}).evaluate(run)
    n = len(per_query)
    return {
        "R@1": sum(v["success_1"] for v in per_query.values()) / n,
        "R@5": sum(v["success_5"] for v in per_query.values()) / n,
        "R@10": sum(v["success_10"] for v in per_query.values()) / n,
        "MRR": sum(v["recip_rank"] for v in per_query.values()) / n,
    }


def test_first_relevant_ranks_equal_a_sorted_ranking():
    from unimm.inference.metrics import first_relevant_ranks

    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (50, 9), generator=gen).float()  # many ties
    relevant = torch.rand(50, 9, generator=gen) < 0.3
    relevant[:, 4] |= ~relevant.any(1)
    order = torch.argsort(-scores, dim=1, stable=True)
    brute = torch.tensor([next(r for r, c in enumerate(order[q]) if relevant[q, c]) for q in range(50)])
    assert torch.equal(first_relevant_ranks(scores, relevant), brute)


@pytest.mark.parametrize("name", ["coco", "flickr30k"])
def test_karpathy_retrieval_equals_trec_eval(trained, tmp_path, name):
    checkpoint, _ = trained
    karpathy(tmp_path / name, name)
    output, results = eval_benchmark(
        name, tmp_path / name, checkpoint, tmp_path / "results.json", "--batch-size", "3"
    )
    assert "text_to_image" in output and "not the usual" in output

    # the test split only (restval, train, val left out), the first five captions of each image
    test_images = [0, 1, 3, 6]
    folder = "val2014" if name == "coco" else "flickr30k-images"
    files = [f"COCO_val2014_{i:012d}.jpg" if name == "coco" else f"{1000 + i}.jpg" for i in test_images]
    image_ids = [str(500 + i) if name == "coco" else str(1000 + i) for i in test_images]
    captions = [
        (str(10 * i + k), f"a {WORDS[i % 6]} picture {i} number {k}") for i in test_images for k in range(5)
    ]
    owner = [image_ids[n // 5] for n in range(len(captions))]
    text_emb = direct_embeddings(checkpoint, [("text", t) for _, t in captions])
    image_emb = direct_embeddings(checkpoint, [("image", str(tmp_path / name / folder / f)) for f in files])
    scores = text_emb @ image_emb.T
    caption_ids = [c for c, _ in captions]

    t2i = trec(scores, caption_ids, image_ids, [[o] for o in owner])
    i2t = trec(
        scores.T,
        image_ids,
        caption_ids,
        [[c for c, o in zip(caption_ids, owner, strict=True) if o == i] for i in image_ids],
    )
    for direction, expected in (("text_to_image", t2i), ("image_to_text", i2t)):
        got = results["metrics"][direction]
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-9), (direction, key)
    assert results["metrics"]["text_to_image"]["queries"] == 20
    assert results["metrics"]["image_to_text"]["chance@1"] == pytest.approx(5 / 20)

    # per query: the relevant ids, the rank and the top candidates with their scores
    first = results["per_query"]["text_to_image"][0]
    assert first["relevant"] == [owner[0]]
    order = torch.argsort(-scores[0], stable=True)
    assert [c for c, _ in first["ranked"]] == [image_ids[j] for j in order]
    assert [s for _, s in first["ranked"]] == pytest.approx(scores[0][order].tolist(), abs=1e-5)
    assert first["rank"] == 1 + [image_ids[j] for j in order].index(owner[0])
    # each distinct text and image went through the model once, though each is in both tasks
    assert results["timing"]["inputs_embedded"] == 20 + 4
    assert results["data"]["digest"].startswith("sha256:") and results["data"]["images"] == 4


def test_winoground_scores_equal_the_closed_form(trained, tmp_path):
    checkpoint, _ = trained
    root = winoground(tmp_path / "wino")
    _, results = eval_benchmark("winoground", root, checkpoint, tmp_path / "w.json")
    texts = direct_embeddings(
        checkpoint, [("text", f"a {WORDS[(2 * e + c) % 6]} square") for e in range(4) for c in (0, 1)]
    )
    images = direct_embeddings(
        checkpoint,
        [("image", str(root / "images" / f"ex_{e}_img_{i}.png")) for e in range(4) for i in (0, 1)],
    )
    text_ok, image_ok = [], []
    for e in range(4):
        s = texts[2 * e : 2 * e + 2] @ images[2 * e : 2 * e + 2].T  # s[c, i]
        text_ok.append(bool(s[0, 0] > s[1, 0] and s[1, 1] > s[0, 1]))
        image_ok.append(bool(s[0, 0] > s[0, 1] and s[1, 1] > s[1, 0]))
        got_scores = results["per_query"]["winoground"][e]["scores"]
        assert [x for row in got_scores for x in row] == pytest.approx(s.flatten().tolist(), abs=1e-5)
    got = results["metrics"]["winoground"]
    assert got["text"] == pytest.approx(sum(text_ok) / 4)
    assert got["image"] == pytest.approx(sum(image_ok) / 4)
    assert got["group"] == pytest.approx(sum(t and i for t, i in zip(text_ok, image_ok, strict=True)) / 4)
    relation = got["by_collapsed_tag"]["Relation"]  # examples 1 and 3
    assert relation["text"] == pytest.approx((text_ok[1] + text_ok[3]) / 2) and relation["pairs"] == 2


# ---------------------------------------------------------------------------------------------
# Quirks and bad input (no checkpoint needed: the release is checked before the model loads)


def load(name: str, path: Path, **kw):
    from unimm.benchmarks import get_benchmark

    return get_benchmark(name).load(path, **kw)


def test_karpathy_quirks_and_limit(tmp_path):
    karpathy(tmp_path, "coco")
    data = load("coco", tmp_path / "dataset_coco.json", limit=2)
    t2i, i2t = data.tasks
    first_two = [q.parts[0][1] for q in t2i.queries[:2]]
    assert first_two == ["a red picture 0 number 0", "a red picture 0 number 1"]  # stripped
    assert len(t2i.queries) == 10 and len(i2t.relevant[1]) == 5  # six captions: the first five
    assert any("--limit 2" in n for n in data.notes)
    # images named in the file but missing on disk: all named in one error
    for f in (tmp_path / "val2014").glob("*0001.jpg"):
        f.unlink()
    with pytest.raises(Exception, match=r"1 image\(s\) not found .*COCO_val2014_000000000001.jpg"):
        load("coco", tmp_path)


def test_not_the_named_benchmark(tmp_path):
    from unimm.errors import UnimmError

    winoground(tmp_path / "w", examples=1)
    with pytest.raises(
        UnimmError, match=r"not the coco benchmark; expected dataset_coco.json.*found examples.jsonl, images/"
    ):
        load("coco", tmp_path / "w")
    karpathy(tmp_path / "c", "coco")
    shutil.copy(tmp_path / "c" / "dataset_coco.json", tmp_path / "c" / "dataset_flickr30k.json")
    with pytest.raises(UnimmError, match="a Karpathy split of 'coco', not 'flickr30k'; use --benchmark coco"):
        load("flickr30k", tmp_path / "c")
    doc = json.loads((tmp_path / "c" / "dataset_coco.json").read_text())
    for image in doc["images"]:
        image["split"] = "train"
    (tmp_path / "c" / "dataset_coco.json").write_text(json.dumps(doc))
    with pytest.raises(UnimmError, match=r"no image in the 'test' split \(found train \(7\)\)"):
        load("coco", tmp_path / "c")
    (tmp_path / "w" / "examples.jsonl").write_text('{"id": 0, "caption_0": "x"}\n')
    with pytest.raises(UnimmError, match=r"examples.jsonl:1: field 'caption_1' should be a str, is missing"):
        load("winoground", tmp_path / "w")


def test_cli_list_unknown_compare_and_headless_checkpoint(trained, tmp_path):
    listed = invoke("eval", "--list")
    assert listed.exit_code == 0 and "dataset_coco.json" in listed.output and "winoground" in listed.output
    unknown = invoke("eval", "--benchmark", "cocoa", "--data", str(tmp_path), "--model", "x")
    assert unknown.exit_code != 0 and "unknown; known: coco, flickr30k" in unknown.output
    a = {"benchmark": "coco", "model": "a", "metrics": {"text_to_image": {"R@1": 0.25, "R@5": 0.5}}}
    b = {"benchmark": "coco", "model": "b", "metrics": {"text_to_image": {"R@1": 0.5, "R@5": 0.5}}}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    compared = invoke("eval", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert compared.exit_code == 0
    line = next(x for x in compared.output.splitlines() if "R@1" in x)
    assert line.split()[-3:] == ["0.250", "0.500", "+0.250"]
    # a checkpoint folder without its retrieval head
    checkpoint, _ = trained
    headless = tmp_path / "headless"
    shutil.copytree(checkpoint, headless)
    (headless / "retrieval_head.safetensors").unlink()
    karpathy(tmp_path / "c", "coco")
    result = invoke("eval", "--benchmark", "coco", "--data", str(tmp_path / "c"), "--model", str(headless))
    assert result.exit_code != 0 and "retrieval_head.safetensors" in result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# During training


def test_training_logs_benchmarks_and_keeps_the_best_checkpoint(tiny_shards, tmp_path):
    from tests.helpers import config, metrics
    from unimm.commands.train import run as train

    karpathy(tmp_path / "coco", "coco")
    settings = [
        f"train.benchmarks.coco={tmp_path / 'coco'}",
        "train.benchmark_split=test",
        "train.eval_every=1",
        "train.save_every=100",
        "train.keep_last=1",
        "train.best_metric=coco/image_to_text/MRR",
    ]
    run_dir = tmp_path / "run"
    train(config(run_dir, tiny_shards, "train.max_steps=3", *settings), progress=False)
    logged = metrics(run_dir)
    values = [line["coco/image_to_text/MRR"] for line in logged]
    assert len(values) == 3 and all("coco/text_to_image/R@1" in line for line in logged)
    best_step = 1 + values.index(max(values))  # the first step reaching the maximum
    record = json.loads((run_dir / "best.json").read_text())
    assert record["step"] == best_step and record["value"] == pytest.approx(max(values))
    assert (run_dir / "best").resolve() == (run_dir / f"step-{best_step:06d}").resolve()
    assert (run_dir / "best" / "retrieval_head.safetensors").is_file()  # kept despite keep_last=1
    # the checkpoint, loaded, scores what the live model scored at that step
    _, reloaded = eval_benchmark("coco", tmp_path / "coco", run_dir / "best", tmp_path / "best.json")
    assert reloaded["metrics"]["image_to_text"]["MRR"] == pytest.approx(max(values), abs=1e-6)
    # resumed, the run keeps comparing against the recorded best
    train(config(run_dir, tiny_shards, "train.max_steps=5", *settings, resume=True), progress=False)
    values = [line["coco/image_to_text/MRR"] for line in metrics(run_dir)]
    record = json.loads((run_dir / "best.json").read_text())
    assert len(values) == 5 and record["step"] == 1 + values.index(max(values))


def test_training_benchmark_settings_are_checked_before_the_first_step(tiny_shards, tmp_path):
    from tests.helpers import config
    from unimm.commands.train import run as train
    from unimm.errors import UnimmError

    winoground(tmp_path / "w", examples=1)
    with pytest.raises(
        UnimmError, match=r"train.benchmarks.winoground: winoground: no 'val' split \(it has test\)"
    ):
        train(
            config(
                tmp_path / "r1",
                tiny_shards,
                f"train.benchmarks.winoground={tmp_path / 'w'}",
                "train.eval_every=1",
            )
        )
    with pytest.raises(
        UnimmError,
        match=r"best_metric 'winoground/winoground/R@1': not a logged figure.*winoground/winoground/group",
    ):
        train(
            config(
                tmp_path / "r2",
                tiny_shards,
                f"train.benchmarks.winoground={tmp_path / 'w'}",
                "train.eval_every=1",
                "train.benchmark_split=test",
                "train.best_metric=winoground/winoground/R@1",
            )
        )
    assert not (tmp_path / "r2" / "step-000001").exists()


def test_candidate_lists_and_exclusions_rank_within_what_is_left():
    """MMEB-style per-query candidates and VIST-style exclusions, against a hand-made ranking."""
    from unimm.benchmarks.base import Item, RankingTask
    from unimm.benchmarks.run import ItemEncoder, rank_task

    class FixedVectors:  # a stand-in session: vectors chosen so the ranking is known by hand
        def instruction_for(self, role):
            return ""

        def embed_views(self, samples, role="document"):
            return torch.stack([torch.tensor(VECTORS[s.slices[0].text]) for s in samples])

    VECTORS = {"q": [1.0, 0.0], "a": [0.9, 0.1], "b": [0.6, 0.4], "c": [0.2, 0.8], "d": [0.95, 0.05]}
    gallery = [Item.text(k, k) for k in "abcd"]
    query = Item.text("q0", "q")
    scores = {k: torch.tensor(VECTORS["q"]) @ torch.tensor(v) for k, v in VECTORS.items()}
    order = sorted("abcd", key=lambda k: -scores[k])  # d, a, b, c
    assert order == ["d", "a", "b", "c"]
    # candidates: only b, c, a (d is not offered) → a first; b relevant at rank 2
    task = RankingTask("mmeb", [query], gallery, [["b"]], candidates=[["b", "c", "a"]])
    out = rank_task(ItemEncoder(FixedVectors()), task)
    assert out["per_query"][0]["rank"] == 2 and [c for c, _ in out["per_query"][0]["ranked"]] == [
        "a",
        "b",
        "c",
    ]
    assert out["metrics"]["chance@1"] == pytest.approx(1 / 3)
    # exclusion: d and a removed from the full gallery → b first
    task = RankingTask("vist", [query], gallery, [["b"]], exclude=[["d", "a"]])
    out = rank_task(ItemEncoder(FixedVectors()), task)
    assert out["per_query"][0]["rank"] == 1 and [c for c, _ in out["per_query"][0]["ranked"]] == ["b", "c"]
    assert out["metrics"]["R@1"] == 1.0 and out["metrics"]["chance@1"] == pytest.approx(1 / 2)
