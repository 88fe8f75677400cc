"""Training: resume equivalence, learning, checkpoints, bad configs (several processes: test_parallel)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import RECIPE, config, metrics

from unimm.commands.train import run
from unimm.config import TrainConfig, build_config
from unimm.data.samples import Slice
from unimm.errors import ConfigError, UnimmError


def test_resume_after_kill_reproduces_the_losses(tmp_path, tiny_shards):
    """24 samples in batches of 8: the run resumes from step 3, the end of the first epoch, so the
    second epoch's cut points (drawn afresh per epoch) must be drawn the same after a resume."""
    args = [
        "--recipe",
        str(RECIPE),
        "--set",
        f"data.train={tiny_shards}",
        "--set",
        "train.max_steps=6",
        "--set",
        "train.save_every=3",
        "--set",
        "data.prefetch=2",  # the full run reads through the prefetch thread
        "-q",
    ]
    cmd = [sys.executable, "-m", "unimm.cli", "train", *args]
    full = subprocess.run([*cmd, "--out", str(tmp_path / "full")], capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    workers = ["--set", "data.workers=2"]  # the interrupted run through worker processes
    killed = subprocess.run(
        [*cmd, *workers, "--out", str(tmp_path / "part")],
        capture_output=True,
        text=True,
        env={**os.environ, "UNIMM_FAULT_AFTER_STEPS": "4"},
    )
    assert killed.returncode == 75
    assert [m["step"] for m in metrics(tmp_path / "part")] == [1, 2, 3, 4]
    again = subprocess.run([*cmd, "--out", str(tmp_path / "part")], capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = subprocess.run(
        [*cmd, *workers, "--out", str(tmp_path / "part"), "--resume"], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    want, got = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(want, got, strict=True):
        for key in ("loss", "loss_gen", "loss_disc", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)


def test_joint_training_learns_to_caption_and_retrieve(tmp_path, tiny_teachers):
    """8 captioned images, one batch: loss_gen falls > 90 % and in-batch R@1 reaches 1.0."""
    import random

    from unimm.commands.prepare import run as prepare
    from unimm.config import PrepareConfig
    from unimm.data.collate import Collator
    from unimm.data.shards import read_samples
    from unimm.data.synthetic import draw_scene, random_scene
    from unimm.model.checkpoint import load_checkpoint

    rng = random.Random(3)
    scenes = []
    while len(scenes) < 8:  # 8 different captions
        scene = random_scene(rng)
        if scene.caption not in {s.caption for s in scenes}:
            scenes.append(scene)
    (tmp_path / "images").mkdir()
    rows = []
    for i, scene in enumerate(scenes):
        draw_scene(scene, 32, rng).save(tmp_path / "images" / f"{i}.png")
        rows.append({"id": f"c{i}", "slices": [{"image": f"images/{i}.png"}, {"text": scene.caption}]})
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare(
        build_config(
            PrepareConfig,
            options={
                "prepare.inputs": [str(tmp_path / "caps.jsonl")],
                "prepare.out": str(tmp_path / "shards"),
                **{f"teachers.{k}": str(v) for k, v in tiny_teachers.items()},
            },
        ),
        progress=False,
    )
    cfg = config(
        tmp_path / "run",
        tmp_path / "shards",
        "train.max_steps=400",
        "train.save_every=400",
        "data.cut_points=2",
        "data.shuffle_buffer=1",
    )
    run(cfg, progress=False)
    history = metrics(tmp_path / "run")
    assert history[-1]["loss_gen"] < 0.1 * history[0]["loss_gen"], (
        history[0]["loss_gen"],
        history[-1]["loss_gen"],
    )
    model, processor, _ = load_checkpoint(tmp_path / "run" / "step-000400")
    col = Collator.for_model(
        model,
        processor,
        max_length=256,
        cut_points=2,
    )
    samples = list(read_samples(tmp_path / "shards", split_by_node=False, split_by_worker=False))
    batch = col(samples)
    batch["views"] = [(b, c) for b in range(8) for c in (0, 1)]  # image view, then image + caption
    emb = model.eval().embed(batch)
    image_views, full_views = emb[0::2], emb[1::2]
    top1 = (image_views @ full_views.T).argmax(1)
    assert (top1 == torch.arange(8)).float().mean().item() == 1.0


@pytest.mark.parametrize("variant", ["full", "lora", "lora-merged"])
def test_checkpoint_round_trip(tmp_path, tiny_shards, variant):
    from unimm.data.collate import Collator
    from unimm.data.shards import read_samples
    from unimm.model.checkpoint import load_checkpoint, save_checkpoint
    from unimm.training.trainer import build_model

    extra = (
        []
        if variant == "full"
        else ["model.lora=true", "model.train_lm=false", "model.lora_r=4", "model.lora_alpha=8"]
    )
    cfg = config(tmp_path / "run", tiny_shards, *extra)
    (tmp_path / "run").mkdir()
    model, processor = build_model(cfg, tmp_path / "run", None)
    with torch.no_grad():  # move every trainable weight off its initial value
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(tmp_path / "ckpt", model, processor, {"step": 3}, merge_lora=variant == "lora-merged")
    loaded, _, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta["step"] == 3 and meta["lora"] == (variant == "lora")
    col = Collator.for_model(
        model,
        processor,
        max_length=256,
    )
    batch = col(list(read_samples(tiny_shards, split_by_node=False, split_by_worker=False))[:4])
    model.eval()
    loaded.eval()
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
        logits_a = model.base(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            **batch["image_inputs"],
        ).logits
        logits_b = loaded.base(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            **batch["image_inputs"],
        ).logits
    tol = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(b.embeddings, a.embeddings, **tol)
    torch.testing.assert_close(b.loss_gen, a.loss_gen, **tol)
    if variant != "lora":  # the unmerged base alone differs from base + adapters by design
        torch.testing.assert_close(logits_b, logits_a, **tol)
    assert not list(tmp_path.glob(".ckpt.*")), "no temporary folders are left behind"


def test_bad_configurations_are_clear(tmp_path, tiny_shards):
    with pytest.raises(ConfigError) as info:
        build_config(
            TrainConfig,
            overrides=[
                "train.lr=0",
                "model.lora=true",
                "model.train_lm=true",
                "data.weights=[1, 2]",
                "train.alpha=-1",
                "align.student=gak",
            ],
        )
    text = str(info.value)
    for expected in (
        "model.path: give a local model folder",
        "data.train: give at least one shard directory",
        "train.lr: must be > 0",
        "model.train_lm",
        "data.weights",
        "train.alpha",
        "align.student: unknown key",
        "out: give a run",
    ):
        assert expected in text, text
    no_teachers = tmp_path / "plain"
    from unimm.commands.prepare import run as prepare
    from unimm.config import PrepareConfig
    from unimm.data.synthetic import write_synthetic

    data = write_synthetic(tmp_path / "d", 10)
    prepare(
        build_config(PrepareConfig, options={"prepare.inputs": [str(data)], "prepare.out": str(no_teachers)}),
        progress=False,
    )
    with pytest.raises(UnimmError, match=r"train\.alpha=0") as err:
        run(config(tmp_path / "run", no_teachers), progress=False)
    assert str(no_teachers) in str(err.value) and "--teacher-clip" in str(err.value)
    with pytest.raises(UnimmError, match="not a finished"):
        run(config(tmp_path / "run2", tmp_path / "missing"), progress=False)


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, tiny_shards):
    cfg = config(
        tmp_path / "run",
        tiny_shards,
        "train.max_steps=30",
        "train.lr=1e30",
        "train.max_grad_norm=0",
        "train.max_nonfinite=3",
    )
    with pytest.raises(UnimmError, match="3 steps in a row had a non-finite loss"):
        run(cfg, progress=False)
    rows = metrics(tmp_path / "run")
    assert any(r["skipped"] for r in rows) and all(r["skipped"] == (r["loss"] != r["loss"]) for r in rows)


def test_periodic_evaluation_is_logged(tmp_path, tiny_shards):
    cfg = config(
        tmp_path / "run",
        tiny_shards,
        "train.max_steps=4",
        f"data.eval={tiny_shards}",
        "train.eval_every=2",
        "train.eval_batches=1",
        "train.save_every=4",
    )
    run(cfg, progress=False)
    rows = metrics(tmp_path / "run")
    assert [("eval_loss_gen" in r) for r in rows] == [False, True, False, True]
    assert rows[-1]["eval_loss_gen"] > 0 and rows[-1]["eval_loss_disc"] >= 0
    # the checkpoint's model card shows that step's figures, and only that step's
    meta = json.loads((tmp_path / "run" / "step-000004" / "unimm.json").read_text())
    assert meta["evaluation"] == {k: rows[-1][k] for k in ("eval_loss_gen", "eval_loss_disc")}
    card = (tmp_path / "run" / "step-000004" / "README.md").read_text()
    assert f"| eval_loss_gen | {rows[-1]['eval_loss_gen']:.4f} |" in card and "step 4" in card


def test_gradient_caching_equals_the_full_batch(tmp_path, tiny_shards):
    """Chunks of 2 samples with cached embedding gradients give the full batch's gradient."""
    import contextlib

    from unimm.data.collate import Collator
    from unimm.data.shards import read_samples
    from unimm.training.step import train_step, train_step_cached
    from unimm.training.trainer import build_model

    cfg = config(tmp_path / "run", tiny_shards, "train.alpha=2.0")
    (tmp_path / "run").mkdir()
    model, processor = build_model(cfg, tmp_path / "run", None)
    col = Collator.for_model(
        model,
        processor,
        max_length=256,
        cut_points=3,
    )
    samples = list(read_samples(tiny_shards, split_by_node=False, split_by_worker=False))[:8]
    full = train_step(model, col(samples), cfg)
    full.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    chunks = [col(samples[i : i + 2]) for i in range(0, 8, 2)]
    cached = train_step_cached(model, chunks, cfg, lambda loss: loss.backward(), contextlib.nullcontext)
    assert cached.loss_disc == pytest.approx(full.loss_disc, rel=1e-5)
    assert cached.loss_gen == pytest.approx(full.loss_gen, rel=1e-5)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    # and a run with it trains
    run(
        config(
            tmp_path / "run2",
            tiny_shards,
            "train.max_steps=3",
            "train.save_every=3",
            "train.grad_cache_chunk=3",
        ),
        progress=False,
    )
    assert [m["step"] for m in metrics(tmp_path / "run2")] == [1, 2, 3]


def test_training_options_run_together(tmp_path, tiny_shards):
    """Accumulation, checkpointing, bf16 autocast, two weighted sources and keep_last at once."""
    cfg = config(
        tmp_path / "run",
        tiny_shards,
        f"data.train=[{tiny_shards}, {tiny_shards}]",
        "data.weights=[3, 1]",
        "train.grad_accum=2",
        "train.batch_size=2",
        "train.gradient_checkpointing=true",
        "train.mixed_precision=bf16",
        "train.max_steps=3",
        "train.save_every=1",
        "train.keep_last=1",
    )
    result = run(cfg, progress=False)
    assert result["step"] == 3 and all(m["loss"] == m["loss"] for m in metrics(tmp_path / "run"))
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == ["step-000003"]


def test_sources_are_mixed_by_weight(tiny_shards):
    from unimm.config import DataOptions
    from unimm.data.stream import DataStream

    stream = DataStream(
        DataOptions(train=[str(tiny_shards)] * 2, weights=[3.0, 1.0], shuffle_buffer=1), seed=0
    )
    for _ in range(400):
        stream.next()
    first, second = stream.position()["taken"]
    assert first + second == 400 and 2.4 < first / second < 3.8


def test_prefetcher_saves_what_was_consumed_and_raises_thread_errors(tiny_shards):
    import time

    from unimm.config import DataOptions
    from unimm.data.stream import DataStream, Prefetcher

    stream = DataStream(DataOptions(train=[str(tiny_shards)], shuffle_buffer=1), seed=0)
    prefetcher = Prefetcher(stream, 2, lambda samples: [s.id for s in samples], depth=2)
    first = prefetcher.next()
    time.sleep(0.3)  # the thread reads ahead meanwhile
    assert prefetcher.position["draws"] == 2 and stream.position()["draws"] > 2
    replay = DataStream(DataOptions(train=[str(tiny_shards)], shuffle_buffer=1), seed=0)
    assert [replay.next().id for _ in range(2)] == first
    prefetcher.close()

    def broken(samples):
        raise RuntimeError("collation failed")

    failing = Prefetcher(DataStream(DataOptions(train=[str(tiny_shards)]), seed=0), 2, broken)
    with pytest.raises(RuntimeError, match="collation failed"):
        failing.next()
    failing.close()


def _ids(samples: list[dict]) -> tuple[list, int]:
    return [s.id for s in samples], 0


def _fail_on_third(samples: list[dict]):
    raise UnimmError("a clear problem")


def test_worker_processes_make_the_same_batches_in_the_same_order(tiny_shards):
    """Worker processes (each making every n-th batch) give the single-process sequence and positions."""
    from unimm.config import DataOptions
    from unimm.data.stream import DataStream, InlineBatches, WorkerBatches

    data = DataOptions(train=[str(tiny_shards)] * 2, weights=[2.0, 1.0], shuffle_buffer=4)
    inline = InlineBatches(DataStream(data, seed=3), 3, _ids)
    want = []
    for _ in range(10):  # 30 samples of 24: into the second epoch
        want.append((inline.next(), inline.position))
    workers = WorkerBatches(data, 3, None, 3, _ids, workers=2, depth=2)
    got = []
    for _ in range(10):
        got.append((workers.next(), workers.position))
    workers.close()
    assert got == want
    resumed = WorkerBatches(data, 3, want[3][1], 3, _ids, workers=3, depth=1)
    assert [(resumed.next(), resumed.position) for _ in range(6)] == want[4:]
    resumed.close()
    failing = WorkerBatches(data, 3, None, 3, _fail_on_third, workers=2, depth=1)
    with pytest.raises(UnimmError) as err:
        failing.next()
    assert str(err.value) == "a clear problem"  # no worker traceback in the message
    failing.close()


def test_a_sample_with_a_corrupt_image_is_left_out_of_its_batch(tiny_shards):
    from unimm.data.shards import read_samples
    from unimm.data.stream import BatchMaker

    samples = list(read_samples(tiny_shards, split_by_node=False, split_by_worker=False, decode_images=False))
    with_image = [s for s in samples if "image" in s.kinds()][:3]
    broken = with_image[1].replace(
        slices=[Slice.of_image(b"not a jpeg") if x.kind == "image" else x for x in with_image[1].slices]
    )
    made = BatchMaker(lambda kept: [(s.id, [type(x.image).__name__ for x in s.slices]) for s in kept])
    payload, left_out = made([with_image[0], broken, with_image[2]])
    assert left_out == 1
    assert [sid for sid, _ in payload] == [with_image[0].id, with_image[2].id]
    assert all("bytes" not in kinds for _, kinds in payload)  # images decoded
    with pytest.raises(UnimmError, match="prepare them again"):
        made([broken])


@pytest.mark.gpu
def test_cuda_bf16_training_follows_fp32_and_learns(tmp_path, tiny_shards):
    """On a GPU: bf16 autocast stays near fp32 on the first step, and both learn (run with -m gpu)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    steps = ["train.max_steps=30", "train.save_every=30", "train.lr=3e-3"]
    fp32 = run(config(tmp_path / "fp32", tiny_shards, *steps), progress=False)
    bf16 = run(config(tmp_path / "bf16", tiny_shards, *steps, "train.mixed_precision=bf16"), progress=False)
    first32, first16 = metrics(tmp_path / "fp32")[0], metrics(tmp_path / "bf16")[0]
    assert first16["loss"] == pytest.approx(first32["loss"], rel=3e-2)
    for result, first in ((fp32, first32), (bf16, first16)):
        assert result["loss_gen"] < 0.8 * first["loss_gen"]
    meta = json.loads((tmp_path / "bf16" / "step-000030" / "unimm.json").read_text())
    assert meta["parallelism"]["kind"] == "NO"


def test_a_crash_leaves_nothing_that_breaks_the_resume(tmp_path, tiny_shards):
    """What a crash leaves — a torn last metrics line, an unfinished checkpoint folder, a
    checkpoint renamed away in the middle of being replaced — is tidied by `--resume`, which then
    reproduces the uninterrupted run's losses exactly."""
    import shutil

    settings = ("train.max_steps=4", "train.save_every=2")
    run(config(tmp_path / "full", tiny_shards, *settings), progress=False)
    part = shutil.copytree(tmp_path / "full", tmp_path / "part")
    shutil.rmtree(part / "step-000004")
    lines = (part / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text("\n".join(lines[:3]) + '\n{"step": 4, "loss": 1.2')  # torn
    (part / ".step-000004.tmp-999").mkdir()  # a save that never finished
    (part / "step-000002").rename(part / ".step-000002.old-999")  # crashed between the renames
    run(config(part, tiny_shards, *settings, resume=True), progress=False)
    assert not list(part.glob(".step-*"))
    want, got = metrics(tmp_path / "full"), metrics(part)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for a, b in zip(want, got, strict=True):
        for key in ("loss", "loss_gen", "loss_disc", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)


def test_a_run_killed_before_its_first_checkpoint(tmp_path, tiny_shards):
    """Its metrics.jsonl alone: a rerun without --resume is refused (it appended a second run's
    steps before); with --resume it starts again, and the metrics hold one run."""
    settings = ("train.max_steps=2", "train.save_every=2")
    run(config(tmp_path / "fresh", tiny_shards, *settings), progress=False)
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "metrics.jsonl").write_text(
        (tmp_path / "fresh" / "metrics.jsonl").read_text().splitlines()[0] + "\n"
    )
    with pytest.raises(UnimmError, match=r"already holds a run .*pass --resume"):
        run(config(killed, tiny_shards, *settings), progress=False)
    run(config(killed, tiny_shards, *settings, resume=True), progress=False)
    assert [m["step"] for m in metrics(killed)] == [1, 2]
    assert [m["loss"] for m in metrics(killed)] == pytest.approx(
        [m["loss"] for m in metrics(tmp_path / "fresh")]
    )


def test_data_too_small_for_the_launch_names_the_numbers_and_the_fix():
    from unimm.data.stream import check_data_fits

    def manifest(shards, samples):
        return {"counts": {"shards": shards, "samples": samples}}

    check_data_fits([manifest(2, 16)], ["a"], processes=2, batch_size=8)  # exactly enough
    with pytest.raises(UnimmError) as err:
        check_data_fits([manifest(1, 10), manifest(3, 5)], ["a", "b"], processes=2, batch_size=8)
    text = str(err.value)
    assert "a has 1 shard(s) for 2 processes" in text and "--samples-per-shard 5" in text
    assert "b has" not in text  # 3 shards are enough for 2 processes
    assert "15 training samples for 2 process(es) × train.batch_size 8 = 16" in text
    assert "lower train.batch_size to 7 or less" in text


def test_mixed_precision_auto_follows_the_device(monkeypatch):
    import torch

    from unimm.training.distributed import resolve_mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_mixed_precision("auto") == "no" and resolve_mixed_precision("bf16") == "bf16"
    with pytest.raises(UnimmError, match="fp16 needs a GPU"):
        resolve_mixed_precision("fp16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert resolve_mixed_precision("auto") == "fp16" and resolve_mixed_precision("no") == "no"
    with pytest.raises(UnimmError, match=r"Tesla V100 \(compute capability 7.0\) has no native bf16"):
        resolve_mixed_precision("bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_mixed_precision("auto") == "bf16" and resolve_mixed_precision("bf16") == "bf16"
