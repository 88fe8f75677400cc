"""Where the tool's defaults follow the paper: cut points drawn afresh each epoch, and the
trainable set of LoRA adapters plus the retrieval head."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from unimm.data.collate import Collator, Encoded


def _cuts(key: str, epoch: int, slices: int = 12, cut_points: int = 3, seed: int = 0) -> list[int]:
    encoded = Encoded([], [], [("text", i, i + 1) for i in range(slices)], [], key=key, epoch=epoch)
    return Collator.cuts(SimpleNamespace(seed=seed, cut_points=cut_points), encoded)


def test_each_epoch_draws_other_cut_points_reproducibly():
    import hashlib
    import random

    per_epoch = [_cuts("doc-7", e) for e in range(6)]
    assert len({tuple(c) for c in per_epoch}) > 1  # a 12-slice document shows other prefixes
    assert all(c[-1] == 11 and len(c) == 3 for c in per_epoch)  # the whole document always a view
    assert per_epoch == [_cuts("doc-7", e) for e in range(6)]  # the same again: reproducible
    # epoch 0 keeps the seeding of earlier releases (evaluation and single-epoch runs unchanged)
    rng = random.Random(int.from_bytes(hashlib.sha256(b"0/doc-7").digest()[:8], "little"))
    assert per_epoch[0] == sorted({*rng.sample(range(11), 2), 11})


def test_the_stream_tags_each_sample_with_the_epoch_that_drew_it(tiny_shards):
    from unimm.config import DataOptions
    from unimm.data.stream import DataStream

    stream = DataStream(DataOptions(train=[str(tiny_shards)]), seed=0)
    drawn = [stream.next() for _ in range(48)]  # the 24 samples twice
    assert [s.epoch for s in drawn] == [0] * 24 + [1] * 24
    assert sorted(s.key for s in drawn[:24]) == sorted(s.key for s in drawn[24:])


def test_the_default_trainable_set_is_lora_and_the_head(tiny_shards, tmp_path):
    from unimm.config import TrainConfig, build_config
    from unimm.model.parts import find_parts
    from unimm.training.trainer import build_model

    cfg = build_config(
        TrainConfig,
        options={"out": str(tmp_path / "run")},
        overrides=["model.tiny=true", f"data.train={tiny_shards}", "model.lora_r=4"],
    )
    assert cfg.model.lora and not cfg.model.train_projector and not cfg.model.train_vision
    model, _ = build_model(cfg, tmp_path / "run", None)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable), trainable
    assert any("lora_" in n for n in trainable) and any(n.startswith("head.") for n in trainable)
    connector = find_parts(model.mllm).connector
    assert not any(p.requires_grad for p in connector.parameters())


# ---------------------------------------------------------------------------------------------
# Records tagged by task, and the data-reduction rows of the paper's Table 4


def test_a_records_task_is_validated_kept_in_shards_and_masks_its_other_loss(
    tmp_path, tiny_teachers, trained
):
    import json

    import pytest

    from unimm.commands.prepare import run as prepare
    from unimm.config import PrepareConfig, build_config
    from unimm.data.records import record_from_obj, record_to_obj
    from unimm.data.shards import read_samples
    from unimm.data.synthetic import write_synthetic
    from unimm.errors import DataError

    obj = {"id": "a", "slices": [{"text": "x"}], "task": "generative"}
    assert record_to_obj(record_from_obj(obj)) == obj
    assert "task" not in record_to_obj(record_from_obj({"id": "b", "slices": [{"text": "x"}]}))
    with pytest.raises(DataError, match="'task' must be one of both, generative, discriminative"):
        record_from_obj({**obj, "task": "retrieval"}, source="r.jsonl", line=3)
    data = write_synthetic(tmp_path / "data", 6, seed=2)
    lines = [json.loads(x) for x in data.read_text().splitlines()]
    lines[0]["task"] = "discriminative"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))

    def shards(out: str, **extra) -> dict[str, str]:
        options = {"prepare.inputs": [str(data)], "prepare.out": str(tmp_path / out), **extra}
        options |= {f"teachers.{k}": str(v) for k, v in tiny_teachers.items()}
        prepare(build_config(PrepareConfig, options=options), progress=False)
        return {s.id: s.task for s in read_samples(tmp_path / out, decode_images=True)}

    tasks = shards("own")
    assert tasks[lines[0]["id"]] == "discriminative" and set(tasks.values()) == {"both", "discriminative"}
    assert set(shards("tagged", **{"prepare.task": "generative"}).values()) == {"generative"}
    # the collator: a discriminative-only sample has no next-token targets, a generative-only no views
    from unimm.data.collate import Collator
    from unimm.model.checkpoint import load_checkpoint

    model, processor, _ = load_checkpoint(trained[0])
    collator = Collator.for_model(model, processor, cut_points=2, by_task=True)
    samples = list(read_samples(tmp_path / "own", decode_images=True))[:3]
    samples = [
        s.replace(task=t) for s, t in zip(samples, ["both", "generative", "discriminative"], strict=True)
    ]
    batch = collator(samples)
    assert (batch["labels"][2] == -100).all() and (batch["labels"][0] != -100).any()
    assert (batch["labels"][1] != -100).any()
    assert {b for b, _ in batch["views"]} == {0, 2} and batch["tasks"] == [
        "both",
        "generative",
        "discriminative",
    ]
    # evaluation's collator scores every sample both ways, whatever its tag
    plain = Collator.for_model(model, processor, cut_points=2)(samples)
    assert (plain["labels"][2] != -100).any() and {b for b, _ in plain["views"]} == {0, 1, 2}


def test_task_fraction_keeps_the_same_records_each_epoch_and_training_counts_them(tiny_shards, tmp_path):
    import hashlib

    from unimm.config import DataOptions, TrainConfig, build_config
    from unimm.data.stream import DataStream

    def drawn(fraction: dict, seed: int = 0) -> list:
        stream = DataStream(DataOptions(train=[str(tiny_shards)], task_fraction=fraction), seed=seed)
        return [stream.next() for _ in range(48)], stream.seen  # two epochs of the 24 samples

    samples, seen = drawn({"generative": 0.5})
    first = {s.key: s.task for s in samples[:24]}
    assert first == {s.key: s.task for s in samples[24:]}  # the same records reduced every epoch
    kept = {k for k, t in first.items() if t == "both"}
    # the stated rule: a record keeps its generative use when its hash falls under the fraction
    rule = {
        k
        for k in first
        if int.from_bytes(hashlib.sha256(f"0/generative/{k}".encode()).digest()[:8], "little") / 2**64 < 0.5
    }
    assert kept == rule and 0 < len(kept) < 24 and set(first.values()) == {"both", "discriminative"}
    assert seen == {"both": 2 * len(kept), "discriminative": 2 * (24 - len(kept))}
    # generative-only records of a reduced generative task are left out, not converted
    samples, _ = drawn({"discriminative": 0.25})
    assert {s.task for s in samples} == {"both", "generative"}
    # a training run counts what it trained on by task: 3 steps of 8 = one epoch
    from unimm.commands.train import notes, run

    recipe = Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml"
    overrides = [f"data.train={tiny_shards}", "train.max_steps=3", "train.save_every=3"]
    overrides.append("data.task_fraction.generative=0.5")
    cfg = build_config(
        TrainConfig, recipe=recipe, options={"out": str(tmp_path / "run")}, overrides=overrides
    )
    history = run(cfg, progress=False)["history"]
    assert history["samples"] == {"both": len(kept), "generative": 0, "discriminative": 24 - len(kept)}
    assert any("alignment loss only" in n for n in notes(history))
