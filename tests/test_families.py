"""Model families end to end through the CLI, with tiny random models and their own processors.

LLaVA-1.5 and PaliGemma lay images out as unimm's collation does and run every command; LLaVA-NeXT
and Idefics3 give an image a varying number of tokens and are refused with what their processor
does, not a traceback.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from unimm.cli import app
from unimm.tiny.models import FAMILIES, save_tiny_mllm

runner = CliRunner()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: save_tiny_mllm(root / family, family, ["a red square"]) for family in FAMILIES}


def _train(folder, shards, out, *extra: str):
    args = ["train", "--recipe", "tiny-cpu", "--out", str(out), "-q"]
    for item in ("model.tiny=false", f"model.path={folder}", f"data.train={shards}", "train.max_steps=2"):
        args += ["--set", item]
    return runner.invoke(app, [*args, "--set", "train.save_every=2", *extra])


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_loads_offline_with_its_own_processor(folders, family):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from unimm.model.parts import find_parts

    model = AutoModelForImageTextToText.from_pretrained(folders[family], local_files_only=True)
    processor = AutoProcessor.from_pretrained(folders[family], local_files_only=True)
    assert model.config.model_type == family and processor.tokenizer.image_token
    find_parts(model)


@pytest.mark.parametrize("lora", [True, False])
def test_paligemma_trains_embeds_retrieves_and_chats(folders, tiny_shards, tmp_path, lora):
    from unimm.data.shards import read_samples
    from unimm.inference.session import Session

    mode = ["--set", "model.lora=true", "--set", "model.train_lm=false"] if lora else []  # tiny-cpu: full
    result = _train(folders["paligemma"], tiny_shards, tmp_path / "run", *mode)
    assert result.exit_code == 0, result.output
    checkpoint = tmp_path / "run" / "step-000002"
    meta = json.loads((checkpoint / "unimm.json").read_text())
    assert meta["lora"] is lora
    index = tmp_path / "index"
    result = runner.invoke(
        app, ["embed", "--model", str(checkpoint), "--data", str(tiny_shards), "--out", str(index), "-q"]
    )
    assert result.exit_code == 0, result.output
    # The stored vectors are the session's own embedding of the same documents.
    session = Session.load(checkpoint, device="cpu")
    samples = list(read_samples(tiny_shards, split_by_node=False, split_by_worker=False))[:3]
    from unimm.inference.index import load_index

    vectors, rows, _ = load_index(index)
    assert [r["id"] for r in rows[:3]] == [s.id for s in samples]
    torch.testing.assert_close(vectors[:3], session.embed_views(samples), atol=2e-3, rtol=0)  # float16
    result = runner.invoke(
        app, ["retrieve", "--model", str(checkpoint), "--index", str(index), "--query", "red"]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["chat", "--model", str(checkpoint), "--prompt", "What?", "--max-new-tokens", "2"]
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("family", ["llava_next", "idefics3"])
def test_families_with_another_image_layout_are_refused_clearly(folders, tiny_shards, tmp_path, family):
    result = _train(folders[family], tiny_shards, tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert f"model type '{family}': its processor turns an image into" in result.output
    assert "not supported yet (supported: llava, paligemma)" in result.output
    assert "Traceback" not in result.output
