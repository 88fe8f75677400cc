"""The quickstart's held-out records rewritten in each benchmark release's layout, scored with
``unimm eval --benchmark``, and the benchmark runner's throughput beside ``unimm embed`` on the
same inputs (docs/benchmarks.md, "Benchmarks from their releases' files").

    unimm quickstart
    python scripts/miniature_benchmarks.py unimm-quickstart /tmp/mini

The records (``unimm-quickstart/eval/data.jsonl``) become: a Karpathy ``dataset_coco.json`` (each
captioned image one test image, its caption its one sentence), Winoground's ``examples.jsonl``
(the minimal pairs), VIST's ``sis/val.story-in-sequence.json`` (the three-photo stories), MMEB's
``MSCOCO_t2i`` / ``MSCOCO_i2t`` task files (each query against its positive and 9 others drawn
with a fixed seed), MMVP's ``Questions.csv`` (the paired two-choice questions) and MMVP-VLM's
(the minimal pairs as statements, Type = the attribute that differs), VQAv2's val questions and
annotations (the QA records, the answer given by all ten annotators), POPE's and MME's yes/no
questions about the captioned images (their shape, another shape; their colour, another colour),
ScienceQA's problems and MMBench's dev TSV (the two-choice questions); VQAv2 also with
``--rag`` over the quickstart's index. What the figures show:
that the loaders, the protocols and the scores run end to end on a trained checkpoint and move
with training; not how a real model does on the real sets.

Throughput: the COCO miniature's distinct captions and images are also written as one record
file (one image or one text a record) and embedded by ``unimm embed``; both commands' code paths
run in this process on one loaded checkpoint, alternating, best of five after a warm-up round.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image


def records(root: Path) -> list[dict]:
    with open(root / "eval" / "data.jsonl") as f:
        return [json.loads(line) for line in f]


def image_of(record: dict) -> str:
    return next(s["image"] for s in record["slices"] if "image" in s)


def text_of(record: dict) -> str:
    return next(s["text"] for s in record["slices"] if "text" in s)


def coco(rows: list[dict], src: Path, out: Path) -> list[dict]:
    captioned = [r for r in rows if r["meta"]["kind"] in ("caption", "pair")]
    images = []
    for n, r in enumerate(captioned):
        name = f"COCO_val2014_{n:012d}.jpg"
        (out / "val2014").mkdir(parents=True, exist_ok=True)
        Image.open(src / image_of(r)).convert("RGB").save(out / "val2014" / name, quality=95)
        sentence = {"raw": text_of(r) + " ", "sentid": n, "imgid": n}
        images.append(
            {"filepath": "val2014", "filename": name, "cocoid": n, "split": "test", "sentences": [sentence]}
        )
    (out / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    return captioned


def winoground(rows: list[dict], src: Path, out: Path) -> None:
    pairs: dict[str, list[dict]] = {}
    for r in rows:
        if r["meta"]["kind"] == "pair":
            pairs.setdefault(r["meta"]["pair"], []).append(r)
    lines = []
    for e, (a, b) in enumerate(pairs.values()):
        for i, r in enumerate((a, b)):
            (out / "images").mkdir(parents=True, exist_ok=True)
            shutil.copy(src / image_of(r), out / "images" / f"ex_{e}_img_{i}.png")
        example = {"id": e, "image_0": f"ex_{e}_img_0", "image_1": f"ex_{e}_img_1"}
        example.update(caption_0=text_of(a), caption_1=text_of(b), collapsed_tag=a["meta"]["field"])
        lines.append(json.dumps(example))
    (out / "examples.jsonl").write_text("\n".join(lines) + "\n")


def vist(rows: list[dict], src: Path, out: Path) -> None:
    annotations = []
    for r in rows:
        if r["meta"]["kind"] != "story":
            continue
        slices = r["slices"]
        steps = [
            (slices[k]["text"], slices[k + 1]["image"])
            for k in range(len(slices) - 1)
            if "image" in slices[k + 1]
        ]
        for order, (text, image) in enumerate(steps):
            photo = Path(image).stem
            (out / "images" / "val").mkdir(parents=True, exist_ok=True)
            Image.open(src / image).convert("RGB").save(out / "images" / "val" / f"{photo}.jpg", quality=95)
            annotations.append(
                [
                    {
                        "story_id": r["id"],
                        "photo_flickr_id": photo,
                        "worker_arranged_photo_order": order,
                        "text": text,
                    }
                ]
            )
    (out / "sis").mkdir(parents=True, exist_ok=True)
    (out / "sis" / "val.story-in-sequence.json").write_text(json.dumps({"annotations": annotations}))


def mmeb(captioned: list[dict], src: Path, out: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    names = []
    for n, r in enumerate(captioned):
        (out / "eval_images" / "MSCOCO").mkdir(parents=True, exist_ok=True)
        names.append(f"MSCOCO/{n:05d}.jpg")
        Image.open(src / image_of(r)).convert("RGB").save(out / "eval_images" / names[-1], quality=95)
    t2i, i2t = [], []
    for n, r in enumerate(captioned):
        others = rng.sample([m for m in range(len(captioned)) if m != n], 9)
        t2i.append(
            {
                "qry_text": f"Find me an everyday image that matches the given caption: {text_of(r)}",
                "qry_img_path": "",
                "tgt_text": ["<|image_1|>\nRepresent the given image."] * 10,
                "tgt_img_path": [names[m] for m in (n, *others)],
            }
        )
        i2t.append(
            {
                "qry_text": "<|image_1|>\nFind an image caption describing the given everyday image.",
                "qry_img_path": names[n],
                "tgt_text": [text_of(captioned[m]) for m in (n, *others)],
                "tgt_img_path": [""] * 10,
            }
        )
    for task, table in (("MSCOCO_t2i", t2i), ("MSCOCO_i2t", i2t)):
        (out / task).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(table), out / task / "test-00000-of-00001.parquet")


def mmvp(rows: list[dict], src: Path, out: Path) -> None:
    choice = [r for r in rows if r["meta"]["kind"] == "choice"]
    (out / "MMVP Images").mkdir(parents=True, exist_ok=True)
    with open(out / "Questions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Index", "Question", "Options", "Correct Answer"])
        for i, r in enumerate(choice, 1):
            options = r["meta"]["choices"]
            letters = "ab"
            writer.writerow(
                [
                    i,
                    text_of(r),
                    " ".join(f"({x}) {o}" for x, o in zip(letters, options, strict=True)),
                    f"({letters[options.index(r['response'])]})",
                ]
            )
            Image.open(src / image_of(r)).convert("RGB").save(out / "MMVP Images" / f"{i}.jpg", quality=95)


def mmvp_vlm(rows: list[dict], src: Path, out: Path) -> None:
    pairs = [r for r in rows if r["meta"]["kind"] == "pair"]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "Questions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Question ID", "Type", "Statement"])
        for q, r in enumerate(pairs, 1):
            kind = r["meta"]["field"]
            writer.writerow([q, kind, text_of(r)])
            (out / "MLLM_VLM Images" / kind).mkdir(parents=True, exist_ok=True)
            Image.open(src / image_of(r)).convert("RGB").save(
                out / "MLLM_VLM Images" / kind / f"{q}.jpg", quality=95
            )


def _save(src: Path, record: dict, to: Path) -> None:
    to.parent.mkdir(parents=True, exist_ok=True)
    Image.open(src / image_of(record)).convert("RGB").save(to, quality=95)


SHAPES = ("circle", "square", "triangle")


def _scene(caption: str) -> tuple[str, str]:
    """``"two blue squares on the left"`` → ``("blue", "square")``."""
    words = caption.split()
    return words[1], words[2].rstrip("s")


def vqav2(rows: list[dict], src: Path, out: Path) -> None:
    from unimm.benchmarks.scoring import normalize_vqa_answer

    qa = [r for r in rows if r["meta"]["kind"] == "qa"]
    questions, annotations = [], []
    for n, r in enumerate(qa):
        _save(src, r, out / "val2014" / f"COCO_val2014_{n:012d}.jpg")
        questions.append({"image_id": n, "question": text_of(r), "question_id": n})
        answer = normalize_vqa_answer(r["response"])  # the release's answers are normalised ("3")
        answers = [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]
        annotations.append({"question_id": n, "image_id": n, "answer_type": "other", "answers": answers})
    (out / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": questions}))
    (out / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))


def pope_and_mme(captioned: list[dict], src: Path, pope: Path, mme: Path) -> None:
    """POPE: per image, its shape (yes) and another (no); MME existence: its colour and shape (Yes)
    and the same shape in another colour (No)."""
    rng = random.Random(0)
    lines, colours = [], sorted({_scene(r["meta"]["caption"])[0] for r in captioned})
    for n, r in enumerate(captioned):
        colour, shape = _scene(r["meta"]["caption"])
        name = f"COCO_val2014_{n:012d}.jpg"
        _save(src, r, pope / "val2014" / name)
        other = rng.choice([s for s in SHAPES if s != shape])
        for qid, (thing, label) in enumerate(((shape, "yes"), (other, "no"))):
            text = f"Is there a {thing} in the image?"
            lines.append(
                json.dumps({"question_id": 2 * n + qid, "image": name, "text": text, "label": label})
            )
        _save(src, r, mme / "existence" / f"{n:04d}.jpg")
        wrong = rng.choice([c for c in colours if c != colour])
        (mme / "existence" / f"{n:04d}.txt").write_text(
            f"Is there a {colour} {shape} in this image? Please answer yes or no.\tYes\n"
            f"Is there a {wrong} {shape} in this image? Please answer yes or no.\tNo\n"
        )
    (pope / "coco_pope_random.json").write_text("\n".join(lines) + "\n")


def scienceqa_and_mmbench(rows: list[dict], src: Path, sqa: Path, mmb: Path) -> None:
    """The two-choice questions as ScienceQA problems and as MMBench's dev TSV (images inline)."""
    import base64

    choice = [r for r in rows if r["meta"]["kind"] == "choice"]
    problems, tsv = {}, ["\t".join(["index", "question", "hint", "A", "B", "answer", "category", "image"])]
    for n, r in enumerate(choice):
        options = r["meta"]["choices"]
        pid = str(n)
        _save(src, r, sqa / "images" / "test" / pid / "image.png")
        problems[pid] = {
            "question": text_of(r), "choices": options, "answer": options.index(r["response"]), "hint": "",
            "image": "image.png", "split": "test", "subject": r["meta"]["field"], "grade": "grade1",
        }  # fmt: skip
        image = base64.b64encode((src / image_of(r)).read_bytes()).decode()
        letter = "AB"[options.index(r["response"])]
        tsv.append("\t".join([pid, text_of(r), "nan", *options, letter, r["meta"]["field"], image]))
    (sqa / "problems.json").write_text(json.dumps(problems))
    (sqa / "pid_splits.json").write_text(json.dumps({"test": sorted(problems, key=int), "val": []}))
    mmb.mkdir(parents=True, exist_ok=True)
    (mmb / "MMBench_DEV_EN.tsv").write_text("\n".join(tsv) + "\n")


def throughput(checkpoint: Path, data: Path, out: Path, repeats: int = 5) -> dict:
    """``unimm eval --benchmark coco`` against ``unimm embed`` over a record file of the same
    distinct captions and images (one a record): both commands' own code paths in this process,
    on one loaded checkpoint (so the load is on neither side), alternating, best of ``repeats``."""
    import unimm.inference.session as sessions
    from unimm.benchmarks import get_benchmark
    from unimm.commands.embed import run as embed
    from unimm.commands.eval import run_benchmark
    from unimm.config import EmbedConfig, EvalConfig, build_config

    loaded = get_benchmark("coco").load(data)
    texts, images = loaded.tasks[0].queries, loaded.tasks[0].gallery
    distinct = {item.parts for item in (*texts, *images)}
    with open(out / "coco-inputs.jsonl", "w") as f:
        for n, parts in enumerate(sorted(distinct)):
            kind, value = parts[0]
            f.write(json.dumps({"id": f"{kind}-{n}", "slices": [{kind: value}]}) + "\n")
    session = sessions.Session.load(checkpoint, device="cpu")
    sessions.Session.load = classmethod(lambda cls, *a, **k: session)  # embed's own load → this one

    def benchmark(n: int) -> float:
        options = {"eval.benchmark": "coco", "eval.data": [str(data)], "eval.model": str(checkpoint)}
        options.update({"eval.batch_size": 16, "eval.out": str(out / f"throughput-{n}.json")})
        started = time.perf_counter()
        run_benchmark(build_config(EvalConfig, options=options), progress=False, session=session)
        return time.perf_counter() - started

    def plain(n: int) -> float:
        options = {"embed.model": str(checkpoint), "embed.data": [str(out / "coco-inputs.jsonl")]}
        options.update(
            {"embed.out": str(out / f"embed-{n}"), "embed.batch_size": 16, "embed.image_root": "/"}
        )
        started = time.perf_counter()
        embed(build_config(EmbedConfig, options=options), progress=False)
        return time.perf_counter() - started

    seconds: dict[str, list[float]] = {"benchmark": [], "embed": []}
    for n in range(repeats + 1):  # the first round warms up and is not counted
        b, e = benchmark(n), plain(n)
        if n:
            seconds["benchmark"].append(round(b, 4))
            seconds["embed"].append(round(e, 4))
    best = {name: min(values) for name, values in seconds.items()}
    return {
        "queries_and_gallery": len(texts) + len(images),
        "distinct_inputs": len(distinct),
        "seconds": seconds,
        "benchmark_inputs_per_s": len(distinct) / best["benchmark"],
        "embed_inputs_per_s": len(distinct) / best["embed"],
        "benchmark_over_embed": best["embed"] / best["benchmark"],
    }


def main(quickstart: Path, out: Path) -> None:
    checkpoint = quickstart / "run" / "step-001500"
    rows = records(quickstart)
    src = quickstart / "eval"
    out.mkdir(parents=True, exist_ok=False)
    captioned = coco(rows, src, out / "coco")
    winoground(rows, src, out / "winoground")
    vist(rows, src, out / "vist")
    mmeb(captioned, src, out / "mmeb")
    mmvp(rows, src, out / "mmvp")
    mmvp_vlm(rows, src, out / "mmvp-vlm")
    vqav2(rows, src, out / "vqav2")
    pope_and_mme(captioned, src, out / "pope", out / "mme")
    scienceqa_and_mmbench(rows, src, out / "scienceqa-img", out / "mmbench")
    index = quickstart / "index"  # the quickstart's index of its held-out records
    for name, extra, data in (
        ("coco", [], "coco"),
        ("winoground", [], "winoground"),
        ("vist", ["--split", "val"], "vist"),
        ("mmeb", [], "mmeb"),
        ("mmvp", [], "mmvp"),
        ("mmvp-vlm", [], "mmvp-vlm"),
        ("vqav2", ["--split", "val"], "vqav2"),
        ("vqav2", ["--split", "val", "--rag", str(index), "--rag-k", "1"], "vqav2"),
        ("pope", [], "pope"),
        ("mme", [], "mme"),
        ("scienceqa-img", [], "scienceqa-img"),
        ("mmbench", ["--split", "val"], "mmbench"),
    ):
        stem = name + ("-rag" if "--rag" in extra else "")
        command = [
            "unimm",
            "eval",
            "--benchmark",
            name,
            "--data",
            str(out / data),
            "--model",
            str(checkpoint),
        ]
        command += ["--out", str(out / f"{stem}.json"), "--device", "cpu", *extra]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
    print(json.dumps(throughput(checkpoint, out / "coco", out), indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
