"""Shared fixtures: tiny teachers (built once per session), small images and record files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import COLOURS, make_image, write_jsonl

# Without a GPU, Triton kernels run in its interpreter (set before any kernel is defined); on a
# GPU machine the real kernels run (`pytest -m gpu`).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory) -> dict[str, Path]:
    """Folders of tiny random DINOv2, BERT and CLIP models (see unimm.tiny)."""
    from unimm.tiny import save_tiny_teachers

    return save_tiny_teachers(tmp_path_factory.mktemp("teachers"))


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, tiny_teachers) -> Path:
    """Shards (3 of 8 samples) of a synthetic dataset, with tiny teacher features."""
    from unimm.commands.prepare import run
    from unimm.config import PrepareConfig, build_config
    from unimm.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("shards")
    data = write_synthetic(root / "data", 24, seed=1)
    options = {
        "prepare.inputs": [str(data)],
        "prepare.out": str(root / "shards"),
        "prepare.image_size": 32,
        "prepare.samples_per_shard": 8,
        **{f"teachers.{k}": str(v) for k, v in tiny_teachers.items()},
    }
    run(build_config(PrepareConfig, options=options), progress=False)
    return root / "shards"


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_shards) -> tuple[Path, Path]:
    """A tiny checkpoint (2 steps on ``tiny_shards``) and a float32 index of those shards."""
    from unimm.commands.embed import run as embed
    from unimm.commands.train import run as train
    from unimm.config import EmbedConfig, TrainConfig, build_config

    root = tmp_path_factory.mktemp("trained")
    recipe = Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml"
    train(
        build_config(
            TrainConfig,
            recipe=recipe,
            options={"out": str(root / "run")},
            overrides=[f"data.train={tiny_shards}", "train.max_steps=2", "train.save_every=2"],
        ),
        progress=False,
    )
    checkpoint = root / "run" / "step-000002"
    embed(
        build_config(
            EmbedConfig,
            options={
                "embed.model": str(checkpoint),
                "embed.data": [str(tiny_shards)],
                "embed.out": str(root / "index"),
                "embed.dtype": "float32",
            },
        ),
        progress=False,
    )
    return checkpoint, root / "index"


@pytest.fixture
def image_dir(tmp_path) -> Path:
    """A folder ``imgs/`` with six images of different colours and sizes."""
    for i, colour in enumerate(COLOURS):
        make_image(tmp_path / "imgs" / f"{i}.jpg", size=(64 + 16 * i, 48 + 8 * i), colour=colour)
    return tmp_path / "imgs"


@pytest.fixture
def unimm_records(tmp_path, image_dir) -> Path:
    """A unimm JSONL file with 12 interleaved records, some with responses."""
    rows = []
    for i in range(12):
        slices = [{"text": f"record {i} shows colour {i % 6}"}, {"image": f"imgs/{i % 6}.jpg"}]
        if i % 3 == 0:
            slices.append({"text": "and then another picture"})
            slices.append({"image": f"imgs/{(i + 1) % 6}.jpg"})
        row = {"id": f"r{i}", "slices": slices}
        if i % 2:
            row["response"] = f"answer {i}"
        rows.append(row)
    return write_jsonl(tmp_path / "data.jsonl", rows)


def pytest_collection_modifyitems(config, items):
    """`pytest -m gpu` on a machine without CUDA: the GPU tests are skipped, saying why."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
