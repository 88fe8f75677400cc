"""`unimm embed`: stored embeddings equal the model's, per-slice layout, resume, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from unimm.commands.embed import run
from unimm.config import EmbedConfig, build_config
from unimm.errors import UnimmError
from unimm.inference.store import load_index


@pytest.fixture
def checkpoint(trained):
    """The shared tiny checkpoint (see conftest)."""
    return trained[0]


def embed(out, checkpoint, shards, **options):
    opts = {"embed.model": str(checkpoint), "embed.data": [str(shards)], "embed.out": str(out)}
    opts.update({f"embed.{k}": v for k, v in options.items()})
    return run(build_config(EmbedConfig, options=opts), progress=False)


def test_index_holds_the_models_embeddings(tmp_path, checkpoint, tiny_shards):
    from unimm.data.collate import Collator
    from unimm.data.shards import read_samples
    from unimm.model.checkpoint import load_checkpoint

    manifest = embed(tmp_path / "idx", checkpoint, tiny_shards, dtype="float32", part_size=10, batch_size=4)
    assert manifest["count"] == 24 and [p["count"] for p in manifest["parts"]] == [10, 10, 4]
    embeddings, rows, _ = load_index(tmp_path / "idx")
    model, processor, _ = load_checkpoint(checkpoint)
    samples = list(read_samples(tiny_shards, split_by_node=False, split_by_worker=False))
    batch = Collator.for_model(model, processor)(samples)
    batch["views"] = [(b, len(spans) - 1) for b, spans in enumerate(batch["spans"])]
    want = model.eval().embed(batch)
    torch.testing.assert_close(embeddings, want, atol=1e-5, rtol=1e-5)
    assert [r["id"] for r in rows] == [s.id for s in samples]
    assert rows[0]["shard"] == "shard-000000.tar" and rows[0]["key"] == samples[0].key


def test_per_slice_embeddings_and_float16(tmp_path, checkpoint, tiny_shards):
    embed(tmp_path / "idx", checkpoint, tiny_shards, per_slice=True, part_size=100)
    part = load_file(tmp_path / "idx" / "embeddings-00000.safetensors")
    assert part["embeddings"].dtype == torch.float16
    offsets = part["slice_offsets"]
    assert offsets[0] == 0 and offsets[-1] == part["slice_embeddings"].shape[0] and len(offsets) == 25
    last = part["slice_embeddings"][offsets[1:] - 1]
    torch.testing.assert_close(last, part["embeddings"])  # the document row is its last slice's


def test_resume_equals_an_uninterrupted_run(tmp_path, checkpoint, tiny_shards):
    from unimm.inference.store import model_hash

    embed(tmp_path / "full", checkpoint, tiny_shards, dtype="float32", part_size=8)
    embed(tmp_path / "part", checkpoint, tiny_shards, dtype="float32", part_size=8)
    part = tmp_path / "part"
    (part / "manifest.json").unlink()  # as if stopped after two of three parts
    (part / "embeddings-00002.safetensors").unlink()
    (part / "embeddings-00002.json").unlink()
    journal = {
        "model_hash": model_hash(checkpoint),
        "data": [str(tiny_shards)],
        "parts": [{"name": "embeddings-00000", "count": 8}, {"name": "embeddings-00001", "count": 8}],
    }
    (part / ".embed-journal.json").write_text(json.dumps(journal))
    with pytest.raises(UnimmError, match="--resume"):
        embed(part, checkpoint, tiny_shards, dtype="float32", part_size=8)
    embed(part, checkpoint, tiny_shards, dtype="float32", part_size=8, resume=True)
    a, rows_a, _ = load_index(tmp_path / "full")
    b, rows_b, _ = load_index(part)
    torch.testing.assert_close(b, a)
    assert rows_a == rows_b


def test_clear_errors(tmp_path, checkpoint, tiny_shards):
    with pytest.raises(UnimmError, match=r"not a unimm checkpoint|incomplete"):
        embed(tmp_path / "a", tmp_path, tiny_shards)
    with pytest.raises(UnimmError, match="no such file or directory"):
        embed(tmp_path / "b", checkpoint, tmp_path / "nothing")
    with pytest.raises(UnimmError, match=r"no manifest\.json"):
        load_index(tmp_path)


def test_two_processes_embed_the_same_index(tmp_path, checkpoint, tiny_shards):
    """torchrun with 2 CPU processes: each rank writes its parts; one manifest; same vectors per id."""
    import shutil
    import subprocess

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    done = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "-m",
            "unimm.cli",
            "embed",
            "--model",
            str(checkpoint),
            "--data",
            str(tiny_shards),
            "--out",
            str(tmp_path / "ddp"),
            "--dtype",
            "float32",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("embedded 24 documents") == 1
    embed(tmp_path / "one", checkpoint, tiny_shards, dtype="float32")
    a, rows_a, manifest = load_index(tmp_path / "ddp")
    b, rows_b, _ = load_index(tmp_path / "one")
    assert manifest["count"] == 24 and len(manifest["parts"]) == 2
    by_id = {r["id"]: i for i, r in enumerate(rows_b)}
    assert sorted(by_id) == sorted(r["id"] for r in rows_a)
    order = torch.tensor([by_id[r["id"]] for r in rows_a])
    torch.testing.assert_close(a, b[order], atol=1e-5, rtol=1e-5)
    assert not list((tmp_path / "ddp").glob(".embed-journal*"))
