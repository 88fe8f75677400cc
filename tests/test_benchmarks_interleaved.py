"""``unimm eval --benchmark`` for VIST, MMEB, MMVP and MMVP-VLM: miniature copies in the releases'
layouts, each metric against trec_eval or a closed form over independently computed scores,
the layouts' quirks, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import make_image
from tests.test_benchmarks import COLOURS, WORDS, eval_benchmark, load, trec
from unimm.errors import UnimmError

# ---------------------------------------------------------------------------------------------
# Miniature releases


def vist(root: Path, split: str = "val", stories: int = 3) -> Path:
    """``sis/<split>.story-in-sequence.json`` and ``images/<split>/``: five photos a story (one a
    PNG), ids without extension, one story's annotations out of order in the file, captions with
    trailing spaces, and a photo (2000) no story uses."""
    annotations = []
    for s in range(stories):
        story = [
            {
                "story_id": str(50 + s),
                "photo_flickr_id": str(1000 + 10 * s + k),
                "worker_arranged_photo_order": k,
                "text": f"the {WORDS[(s + k) % 6]} day {k} of story {s} ",
                "original_text": "…",
                "album_id": "7",
            }
            for k in range(5)
        ]
        if s == 1:
            story = story[2:] + story[:2]
        annotations += [[a] for a in story]
        for k in range(5):
            fmt, ext = ("PNG", ".png") if (s, k) == (0, 4) else ("JPEG", ".jpg")
            colour = COLOURS[(s + 2 * k) % 6]
            make_image(
                root / "images" / split / f"{1000 + 10 * s + k}{ext}",
                size=(40 + k, 36),
                colour=colour,
                fmt=fmt,
            )
    make_image(root / "images" / split / "2000.jpg")
    (root / "sis").mkdir(parents=True, exist_ok=True)
    doc = {"images": [], "albums": [], "type": "story_in_sequence", "annotations": annotations}
    (root / "sis" / f"{split}.story-in-sequence.json").write_text(json.dumps(doc))
    return root


def mmeb(root: Path) -> Path:
    """Two MMEB task folders in the release's layout: ImageNet-1K (image query, text candidates,
    a repeated candidate) and MSCOCO_t2i (text query, image candidates), images in eval_images/."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for n in range(4):
        make_image(root / "eval_images" / "ImageNet-1K" / f"val_{n}.JPEG", colour=COLOURS[n], fmt="JPEG")
        make_image(root / "eval_images" / "MSCOCO_t2i" / f"coco_{n}.jpg", colour=COLOURS[n + 1], fmt="JPEG")
    labels = [WORDS[n] for n in range(4)]
    imagenet = [
        {
            "qry_text": "<|image_1|>\nRepresent the given image for classification",
            "qry_img_path": f"ImageNet-1K/val_{n}.JPEG",
            "tgt_text": [labels[n], *[x for x in labels if x != labels[n]], labels[(n + 1) % 4]],
            "tgt_img_path": ["", "", "", "", ""],
        }
        for n in range(4)
    ]
    coco = [
        {
            "qry_text": f"Find me an everyday image that matches the given caption: a {WORDS[n + 1]} thing ",
            "qry_img_path": "",
            "tgt_text": ["<|image_1|>\nRepresent the given image."] * 3,
            "tgt_img_path": [f"MSCOCO_t2i/coco_{(n + j) % 4}.jpg" for j in range(3)],
        }
        for n in range(4)
    ]
    for task, rows in (("ImageNet-1K", imagenet), ("MSCOCO_t2i", coco)):
        (root / task).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), root / task / "test-00000-of-00001.parquet")
    return root


def mmvp(root: Path, folder: str = "MMVP Images") -> Path:
    """``Questions.csv`` (with a byte-order mark) and four images: two pairs."""
    rows = ["Index,Question,Options,Correct Answer"]
    for i in range(1, 5):
        options = "(a) Open (b) Closed" if i <= 2 else "(a) Yes (b) No"
        rows.append(f"{i},Is the {WORDS[i]} door open or closed?,{options},({'a' if i % 2 else 'b'})")
        make_image(root / folder / f"{i}.jpg", colour=COLOURS[i], fmt="JPEG")
    (root / "Questions.csv").write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
    return root


def mmvp_vlm(root: Path) -> Path:
    """``Questions.csv`` and ``MLLM_VLM Images/<Type>/<id>.jpg``: two types, one pair each."""
    rows = ["Question ID,Type,Statement"]
    for q in range(1, 5):
        kind = "Orientation" if q <= 2 else "Color"
        rows.append(f"{q},{kind},The square is {WORDS[q]}")
        make_image(root / "MLLM_VLM Images" / kind / f"{q}.jpg", colour=COLOURS[q], fmt="JPEG")
    (root / "Questions.csv").write_text("\n".join(rows) + "\n")
    return root


# ---------------------------------------------------------------------------------------------
# Independent computations


def embed_each(checkpoint: Path, inputs: list[list[tuple[str, str]]]) -> torch.Tensor:
    """Each interleaved input embedded on its own, one forward pass apiece."""
    from unimm.data.adapters import open_image
    from unimm.data.samples import Sample, Slice
    from unimm.inference.session import Session

    session = Session.load(checkpoint, device="cpu")
    rows = []
    for parts in inputs:
        slices = [Slice.of_text(v) if k == "text" else Slice.of_image(open_image(v)) for k, v in parts]
        rows.append(session.embed_views([Sample.of_slices(slices)])[0])
    return torch.stack(rows)


def test_vist_equals_trec_eval_with_and_without_exclusion(trained, tmp_path):
    checkpoint, _ = trained
    root = vist(tmp_path / "vist")
    output, results = eval_benchmark("vist", root, checkpoint, tmp_path / "v.json", "--split", "val")
    assert "captions_images" in output
    folder = root / "images" / "val"
    photos = [f"{1000 + 10 * s + k}" for s in range(3) for k in range(5)]  # 2000.jpg: in no story
    paths = {p: str(next(folder.glob(p + ".*"))) for p in photos}
    texts = [[f"the {WORDS[(s + k) % 6]} day {k} of story {s}" for k in range(5)] for s in range(3)]
    gallery = embed_each(checkpoint, [[("image", paths[p])] for p in photos])
    inputs = {
        "last_caption": [[("text", t[-1])] for t in texts],
        "captions": [[("text", x) for x in t] for t in texts],
        "captions_images": [
            [
                *[
                    part
                    for k in range(4)
                    for part in (("text", t[k]), ("image", paths[f"{1000 + 10 * s + k}"]))
                ],
                ("text", t[4]),
            ]
            for s, t in enumerate(texts)
        ],
    }
    stories = ["50", "51", "52"]
    targets = [[f"{1000 + 10 * s + 4}"] for s in range(3)]
    for task, parts in inputs.items():
        scores = embed_each(checkpoint, parts) @ gallery.T
        for variant, excluding in ((task, task == "captions_images"), (task + "_all", False)):
            if variant not in results["metrics"]:
                continue
            keep = [[p not in photos[5 * s : 5 * s + 4] or not excluding for p in photos] for s in range(3)]
            run_scores = [
                [float(x) if k else -1e9 for x, k in zip(row, mask, strict=True)]
                for row, mask in zip(scores, keep, strict=True)
            ]
            expected = trec(torch.tensor(run_scores), stories, photos, targets)
            got = results["metrics"][variant]
            for key, value in expected.items():
                assert got[key] == pytest.approx(value, abs=1e-9), (variant, key)
    assert results["metrics"]["captions_images"]["gallery"] == 15
    ranked = results["per_query"]["captions_images"][1]["ranked"]
    assert len(ranked) == 10 and not {c for c, _ in ranked} & {"1010", "1011", "1012", "1013"}
    assert results["timing"]["inputs_embedded"] == 15 + 3 + 3 + 3  # each distinct input once


def test_vist_quirks_missing_photos_and_splits(tmp_path):
    root = vist(tmp_path / "vist", split="test")
    data = load("vist", root)  # test is the default split
    story = data.tasks[1].queries[1]  # written out of order in the file: sorted by photo order
    assert next(v for _, v in story.parts) == "the green day 0 of story 1"
    assert any("--split val" in n for n in data.notes)
    (root / "images" / "test" / "1012.jpg").unlink()
    data = load("vist", root / "sis" / "test.story-in-sequence.json", image_root=root)
    assert len(data.tasks[0].queries) == 2 and any(
        "1 of 3 stories left out" in n and "1012" in n for n in data.notes
    )
    assert "1012" not in {i.id for i in data.tasks[0].gallery}
    with pytest.raises(UnimmError, match=r"vist: no 'train' split"):
        load("vist", root, split="train")
    with pytest.raises(
        UnimmError, match=r"no val.story-in-sequence.json, but test.story-in-sequence.json: use --split test"
    ):
        load("vist", root, split="val")
    for f in (root / "images" / "test").iterdir():
        f.unlink()
    with pytest.raises(UnimmError, match=r"vist: 15 image\(s\) not found under .*images/test/1000"):
        load("vist", root)


def test_mmeb_precision_at_1_and_meta_task_averages(trained, tmp_path):
    checkpoint, _ = trained
    root = mmeb(tmp_path / "mmeb")
    output, results = eval_benchmark("mmeb", root, checkpoint, tmp_path / "m.json")
    assert "average: overall" in output and "2 of the 36 tasks" in output
    images = root / "eval_images"
    hits = {}
    labels = [WORDS[n] for n in range(4)]
    queries = embed_each(
        checkpoint,
        [
            [
                ("image", str(images / "ImageNet-1K" / f"val_{n}.JPEG")),
                ("text", "Represent the given image for classification"),
            ]
            for n in range(4)
        ],
    )
    candidates = embed_each(checkpoint, [[("text", x)] for x in labels])
    # VLM2Vec's own rule: right when candidate 0 scores highest of the row (ties to the first)
    rows = [[n, *[m for m in range(4) if m != n], (n + 1) % 4] for n in range(4)]
    hits["ImageNet-1K"] = [int(torch.argmax(candidates[r] @ queries[n])) == 0 for n, r in enumerate(rows)]
    for n in range(4):  # the rank of the positive among the distinct candidates, ties to the positive
        scores = candidates @ queries[n]
        rank = 1 + int((scores > scores[n]).sum())
        assert results["per_query"]["ImageNet-1K"][n]["rank"] == rank
    queries = embed_each(
        checkpoint,
        [
            [("text", f"Find me an everyday image that matches the given caption: a {WORDS[n + 1]} thing")]
            for n in range(4)
        ],
    )
    candidates = embed_each(
        checkpoint,
        [
            [("image", str(images / "MSCOCO_t2i" / f"coco_{m}.jpg")), ("text", "Represent the given image.")]
            for m in range(4)
        ],
    )
    hits["MSCOCO_t2i"] = [
        int(torch.argmax(candidates[[(n + j) % 4 for j in range(3)]] @ queries[n])) == 0 for n in range(4)
    ]
    p1 = {task: sum(h) / 4 for task, h in hits.items()}
    for task, value in p1.items():
        assert results["metrics"][task]["P@1"] == pytest.approx(value), task
        assert results["metrics"][task]["P@1"] == results["metrics"][task]["R@1"]
    averages = results["metrics"]["averages"]
    assert averages["classification"]["P@1"] == pytest.approx(p1["ImageNet-1K"])
    assert averages["retrieval"]["P@1"] == pytest.approx(p1["MSCOCO_t2i"])
    assert averages["overall"]["P@1"] == pytest.approx((p1["ImageNet-1K"] + p1["MSCOCO_t2i"]) / 2)
    assert averages["in_distribution"]["tasks"] == 2 and "out_of_distribution" not in averages
    assert "vqa" not in averages
    assert results["metrics"]["ImageNet-1K"]["chance@1"] == pytest.approx(
        1 / 4
    )  # the repeat is one candidate


def test_mmeb_layout_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = mmeb(tmp_path / "mmeb")
    data = load("mmeb", root / "MSCOCO_t2i")  # one task folder: images from its parent's eval_images/
    assert [t.name for t in data.tasks] == ["MSCOCO_t2i"]
    first = data.tasks[0].gallery[0].parts
    assert first[0][0] == "image" and first[1] == ("text", "Represent the given image.")
    mmvp(tmp_path / "mmvp")
    with pytest.raises(
        UnimmError, match=r"not the mmeb benchmark; expected task folders .* found MMVP Images/, Questions"
    ):
        load("mmeb", tmp_path / "mmvp")
    pq.write_table(
        pa.Table.from_pylist([{"query": "x"}]), root / "MSCOCO_t2i" / "test-00000-of-00001.parquet"
    )
    with pytest.raises(UnimmError, match=r"MSCOCO_t2i/test-00000-of-00001.parquet: no column qry_text"):
        load("mmeb", root)
    (root / "MSCOCO_t2i" / "test-00000-of-00001.parquet").unlink()
    (root / "eval_images" / "ImageNet-1K" / "val_2.JPEG").unlink()
    with pytest.raises(UnimmError, match=r"1 image\(s\) not found .*ImageNet-1K/val_2.JPEG"):
        load("mmeb", root)


def test_mmvp_pair_accuracy_from_option_likelihoods(trained, tmp_path):
    from unimm.data.adapters import open_image
    from unimm.data.samples import Sample, Slice
    from unimm.inference.evaluate import Evaluator

    checkpoint, _ = trained
    root = mmvp(tmp_path / "mmvp", folder="MMVP Imgaes")  # the misspelt folder of some copies
    _, results = eval_benchmark("mmvp", root, checkpoint, tmp_path / "p.json", "--batch-size", "3")
    ev = Evaluator.load(checkpoint, "cpu", batch_size=1)
    right = []
    for i in range(1, 5):
        options = ["(a) Open", "(b) Closed"] if i <= 2 else ["(a) Yes", "(b) No"]
        question = f"Is the {WORDS[i]} door open or closed? " + (
            "(a) Open (b) Closed" if i <= 2 else "(a) Yes (b) No"
        )
        prompt = [Slice.of_image(open_image(root / "MMVP Imgaes" / f"{i}.jpg")), Slice.of_text(question)]
        scores = [float(ev.answer_logprobs([Sample.of_slices(prompt, response=o)])[0]) for o in options]
        got = results["per_query"]["mmvp"][i - 1]
        assert got["logprobs"] == pytest.approx(scores, abs=1e-4)
        right.append(scores.index(max(scores)) == (0 if i % 2 else 1))
    metrics = results["metrics"]["mmvp"]
    assert metrics["accuracy"] == pytest.approx(sum(right) / 4)
    assert metrics["pair_accuracy"] == pytest.approx(((right[0] and right[1]) + (right[2] and right[3])) / 2)
    assert metrics["pairs"] == 2 and metrics["chance"] == 0.5


def test_mmvp_vlm_each_statement_picks_its_own_image(trained, tmp_path):
    checkpoint, _ = trained
    root = mmvp_vlm(tmp_path / "vlm")
    _, results = eval_benchmark("mmvp-vlm", root, checkpoint, tmp_path / "q.json")
    texts = embed_each(checkpoint, [[("text", f"a photo of The square is {WORDS[q]}")] for q in range(1, 5)])
    kinds = ["Orientation", "Orientation", "Color", "Color"]
    images = embed_each(
        checkpoint,
        [[("image", str(root / "MLLM_VLM Images" / kinds[q - 1] / f"{q}.jpg"))] for q in range(1, 5)],
    )
    right = []
    for p in (0, 2):
        s = texts[p : p + 2] @ images[p : p + 2].T  # the official rule: each statement prefers its image
        right.append(bool(s[0, 0] > s[0, 1] and s[1, 1] > s[1, 0]))
        got = results["per_query"]["mmvp-vlm"][p // 2]["scores"]
        assert [x for row in got for x in row] == pytest.approx(s.flatten().tolist(), abs=1e-5)
    metrics = results["metrics"]["mmvp-vlm"]
    assert metrics["pair_accuracy"] == pytest.approx(sum(right) / 2)
    assert metrics["by_type"]["Orientation"]["pair_accuracy"] == float(right[0])
    assert metrics["by_type"]["Color"]["pair_accuracy"] == float(right[1])


def test_mmvp_layout_errors(tmp_path):
    root = mmvp(tmp_path / "mmvp")
    data = load("mmvp", root, limit=1)
    assert data.tasks[0].options[0] == ["(a) Open", "(b) Closed"] and data.tasks[0].answers == [0, 1]
    assert any("not comparable" in n for n in data.notes)
    lines = (root / "Questions.csv").read_text(encoding="utf-8-sig").splitlines()
    lines[2] = lines[2].replace("(b) Closed,(b)", "(b) Closed,(c)")
    (root / "Questions.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(UnimmError, match=r"Questions.csv:3: Correct Answer '\(c\)' is none of the options"):
        load("mmvp", root)
    (root / "Questions.csv").write_text("Index,Question,Answer\n1,q,a\n2,q,b\n")
    with pytest.raises(UnimmError, match=r"Questions.csv:1: no column 'Options', 'Correct Answer'"):
        load("mmvp", root)
    with pytest.raises(UnimmError, match=r"no column 'Question ID', 'Type', 'Statement'"):
        load("mmvp-vlm", root)
    vlm = mmvp_vlm(tmp_path / "vlm")
    (vlm / "MLLM_VLM Images" / "Color" / "4.jpg").unlink()
    with pytest.raises(UnimmError, match=r"1 image\(s\) not found .*MLLM_VLM Images/Color/4"):
        load("mmvp-vlm", vlm)
    with pytest.raises(UnimmError, match=r"not the mmvp benchmark; expected Questions.csv"):
        load("mmvp", tmp_path)


def test_training_logs_mmvp_and_mmeb_averages_as_a_loaded_checkpoint_scores(tiny_shards, tmp_path):
    from tests.helpers import config, metrics
    from unimm.commands.train import run as train

    settings = [
        f"train.benchmarks.mmvp={mmvp(tmp_path / 'mmvp')}",
        f"train.benchmarks.mmeb={mmeb(tmp_path / 'mmeb')}",
        "train.benchmark_split=test",
        "train.eval_every=1",
        "train.save_every=2",
        "train.best_metric=mmeb/overall_average/P@1",
    ]
    run_dir = tmp_path / "run"
    train(config(run_dir, tiny_shards, "train.max_steps=2", *settings), progress=False)
    last = metrics(run_dir)[-1]
    for key in ("mmvp/mmvp/pair_accuracy", "mmeb/ImageNet-1K/P@1", "mmeb/classification_average/P@1"):
        assert key in last, key
    _, mmvp_results = eval_benchmark("mmvp", tmp_path / "mmvp", run_dir / "step-000002", tmp_path / "a.json")
    _, mmeb_results = eval_benchmark("mmeb", tmp_path / "mmeb", run_dir / "step-000002", tmp_path / "b.json")
    assert last["mmvp/mmvp/accuracy"] == pytest.approx(mmvp_results["metrics"]["mmvp"]["accuracy"])
    logprobs = [q["logprobs"] for q in mmvp_results["per_query"]["mmvp"]]
    assert all(len(x) == 2 for x in logprobs)
    overall = mmeb_results["metrics"]["averages"]["overall"]["P@1"]
    assert last["mmeb/overall_average/P@1"] == pytest.approx(overall)
