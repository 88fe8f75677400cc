"""Optimizer and schedule keys of ``train``: parameter groups by part and decay, the schedules
against their closed forms, each optimizer name, and a run whose logged learning rates follow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml"


def _cfg(tmp_path, *overrides: str):
    from unimm.config import TrainConfig, build_config

    return build_config(
        TrainConfig,
        recipe=RECIPE,
        options={"out": str(tmp_path / "run")},
        overrides=["data.train=x", *overrides],
    )


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedules_against_their_closed_forms(schedule):
    from unimm.training.optim import lr_factor

    warmup, total = 5, 25
    for step in range(total + 1):
        got = lr_factor(step, warmup, total, schedule)
        if step < warmup:
            want = step / warmup
        else:
            p = (step - warmup) / (total - warmup)
            want = {"cosine": 0.5 * (1 + math.cos(math.pi * p)), "linear": 1 - p, "constant": 1.0}[schedule]
        assert got == pytest.approx(want), (schedule, step)


def test_parameter_groups_by_part_and_decay(tmp_path, trained):
    from transformers import get_cosine_schedule_with_warmup

    from unimm.model.checkpoint import load_checkpoint
    from unimm.model.parts import find_parts
    from unimm.training.optim import build_optimizer, build_schedule, parameter_groups

    model, _, _ = load_checkpoint(trained[0])
    for p in model.parameters():
        p.requires_grad_(False)
    connector = find_parts(model.mllm).connector
    for p in [*model.head.parameters(), *connector.parameters()]:
        p.requires_grad_(True)
    cfg = _cfg(tmp_path, "train.lr=1e-3", "train.head_lr=5e-3", "train.weight_decay=0.1")
    groups = {g["name"]: g for g in parameter_groups(model, cfg)}
    assert set(groups) == {"head", "head/no_decay", "projector", "projector/no_decay"}
    assert groups["head"]["lr"] == 5e-3 and groups["projector"]["lr"] == 1e-3  # projector_lr unset: lr
    assert groups["head"]["weight_decay"] == 0.1 and groups["head/no_decay"]["weight_decay"] == 0.0
    named = dict(model.named_parameters())
    biases = {n for n, p in named.items() if p.requires_grad and p.ndim < 2}
    assert {id(p) for k in ("head/no_decay", "projector/no_decay") for p in groups[k]["params"]} == {
        id(named[n]) for n in biases
    }
    assert sum(len(g["params"]) for g in groups.values()) == sum(p.requires_grad for p in model.parameters())
    for name, kind in (("adamw", "AdamW"), ("adam", "Adam"), ("sgd", "SGD"), ("adafactor", "Adafactor")):
        assert type(build_optimizer(model, _cfg(tmp_path, f"train.optimizer={name}"))).__name__ == kind
    # the default schedule is transformers' cosine with warm-up, step for step
    cfg = _cfg(tmp_path, "train.max_steps=40", "train.warmup_ratio=0.1")
    ours = build_schedule(build_optimizer(model, cfg), cfg)
    theirs = get_cosine_schedule_with_warmup(build_optimizer(model, cfg), 4, 40)
    for _ in range(40):
        assert ours.get_last_lr() == pytest.approx(theirs.get_last_lr())
        ours.optimizer.step(), ours.step(), theirs.optimizer.step(), theirs.step()
    from unimm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train\.optimizer"):
        _cfg(tmp_path, "train.optimizer=lion")
    with pytest.raises(ConfigError, match=r"train\.head_lr: must be > 0"):
        _cfg(tmp_path, "train.head_lr=0")


def test_a_run_logs_the_learning_rates_of_its_schedule(tmp_path, tiny_shards):
    from unimm.commands.train import run
    from unimm.config import TrainConfig, build_config
    from unimm.training.optim import lr_factor

    overrides = [
        f"data.train={tiny_shards}",
        "train.max_steps=6",
        "train.save_every=6",
        "train.lr_schedule=linear",
    ]
    overrides += ["train.optimizer=sgd", "train.warmup_ratio=0.34", "train.lr=0.01"]
    cfg = build_config(
        TrainConfig, recipe=RECIPE, options={"out": str(tmp_path / "run")}, overrides=overrides
    )
    run(cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [x["lr"] for x in lines if "lr" in x]
    assert logged == pytest.approx([0.01 * lr_factor(s, 3, 6, "linear") for s in range(1, 7)])


def test_epochs_set_the_step_count(tmp_path, tiny_shards):
    from unimm.commands.train import run
    from unimm.config import TrainConfig, build_config
    from unimm.errors import ConfigError
    from unimm.model.checkpoint import read_meta

    # 24 samples, batches of 8: 1.5 epochs are ceil(36 / 8) = 5 optimizer steps
    overrides = [
        f"data.train={tiny_shards}",
        "train.epochs=1.5",
        "train.max_steps=1000",
        "train.save_every=1000",
    ]
    cfg = build_config(
        TrainConfig, recipe=RECIPE, options={"out": str(tmp_path / "run")}, overrides=overrides
    )
    run(cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(x["step"] for x in lines) == 5 and (tmp_path / "run" / "step-000005").is_dir()
    assert read_meta(tmp_path / "run" / "step-000005")["recipe"]["train"]["max_steps"] == 5
    with pytest.raises(ConfigError, match=r"train\.epochs: must be >= 0"):
        _cfg(tmp_path, "train.epochs=-1")
