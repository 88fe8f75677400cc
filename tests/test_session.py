"""The inference session: checkpoints carry their inference settings and load in their saved dtype."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from unimm.cli import app
from unimm.data.shards import read_samples
from unimm.errors import UnimmError
from unimm.inference.session import Session
from unimm.model.checkpoint import load_checkpoint, read_meta, save_checkpoint


def _samples(shards, n=4):
    samples = []
    for sample in read_samples(shards, split_by_node=False, split_by_worker=False):
        samples.append(sample)
        if len(samples) == n:
            break
    return samples


@pytest.fixture(scope="module")
def bf16_checkpoint(trained, tmp_path_factory):
    """The shared tiny checkpoint saved again with bfloat16 weights."""
    checkpoint, _ = trained
    model, processor, meta = load_checkpoint(checkpoint, dtype=torch.bfloat16)
    folder = tmp_path_factory.mktemp("bf16") / "step-000002"
    keep = ("recipe", "step", "data_manifests", "inference")
    save_checkpoint(folder, model.to(torch.bfloat16), processor, {k: meta[k] for k in keep})
    return folder


def test_checkpoints_record_their_inference_settings(trained):
    checkpoint, _ = trained
    raw = json.loads((checkpoint / "unimm.json").read_text())
    recipe = raw["recipe"]["model"]
    assert raw["inference"] == {
        "system_prompt": recipe["system_prompt"],
        "max_length": recipe["max_length"],
        "dtype": "float32",
        "pooling": raw["pooling"],
        "embed_dim": raw["embed_dim"],
        "attn_implementation": recipe["attn_implementation"],
        "dimensions": [raw["embed_dim"]],  # no Matryoshka sizes trained
        "instructions": recipe["instructions"],
        "default_instruction": recipe["default_instruction"],
    }


def test_attention_follows_the_checkpoint_unless_told(trained, tiny_shards):
    """``auto`` loads the attention the checkpoint trained with (sdpa); eager gives the same
    vectors; FlashAttention 2 without its package is refused with the fix, in the config too."""
    from unimm.config import TrainConfig, build_config
    from unimm.errors import ConfigError

    default = Session.load(trained[0], device="cpu")
    eager = Session.load(trained[0], device="cpu", attn_implementation="eager")
    assert default.model.base.config._attn_implementation == "sdpa"
    assert eager.model.base.config._attn_implementation == "eager"
    samples = _samples(tiny_shards)
    torch.testing.assert_close(eager.embed_views(samples), default.embed_views(samples), atol=1e-5, rtol=1e-5)
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(UnimmError, match="needs the flash-attn package"):
            Session.load(trained[0], device="cpu", attn_implementation="flash_attention_2")
        with pytest.raises(ConfigError, match=r"model\.attn_implementation=flash_attention_2: it needs"):
            build_config(
                TrainConfig, recipe="tiny-cpu", overrides=["model.attn_implementation=flash_attention_2"]
            )


def test_a_bf16_checkpoint_loads_in_bf16_unless_told(bf16_checkpoint, trained, tiny_shards):
    assert read_meta(bf16_checkpoint)["inference"]["dtype"] == "bfloat16"
    session = Session.load(bf16_checkpoint, device="cpu")
    assert {p.dtype for p in session.model.mllm.parameters()} == {torch.bfloat16}
    upcast = Session.load(bf16_checkpoint, device="cpu", dtype="float32")
    assert {p.dtype for p in upcast.model.mllm.parameters()} == {torch.float32}
    samples = _samples(tiny_shards)
    ours = Session.load(trained[0], device="cpu").embed_views(samples)
    low = session.embed_views(samples)
    assert low.dtype == torch.float32 and low.shape == ours.shape
    assert torch.nn.functional.cosine_similarity(low, ours).min() > 0.98  # bf16 rounding only
    with pytest.raises(Exception, match="dtype 'float8'"):
        Session.load(bf16_checkpoint, dtype="float8")


def test_inference_commands_load_bf16_and_take_model_dtype(
    bf16_checkpoint, tiny_shards, tmp_path, monkeypatch
):
    """embed, retrieve, chat and eval go through the session: the saved dtype, or --model-dtype."""
    seen = []
    original = Session.__init__

    def spy(self, model, *args, **kwargs):
        seen.append(next(model.mllm.parameters()).dtype)
        original(self, model, *args, **kwargs)

    monkeypatch.setattr(Session, "__init__", spy)
    runner = CliRunner()
    model = ["--model", str(bf16_checkpoint)]
    index = tmp_path / "index"
    done = runner.invoke(app, ["embed", *model, "--data", str(tiny_shards), "--out", str(index), "-q"])
    assert done.exit_code == 0, done.output
    found = runner.invoke(app, ["retrieve", *model, "--index", str(index), "--query", "red", "--top-k", "2"])
    assert found.exit_code == 0, found.output
    said = runner.invoke(app, ["chat", *model, "--prompt", "What?", "--max-new-tokens", "2"])
    assert said.exit_code == 0, said.output
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"id": "q", "slices": [{"text": "a red square"}], "response": "red"}) + "\n")
    scored = runner.invoke(app, ["eval", *model, "--data", str(data), "--model-dtype", "float32"])
    assert scored.exit_code == 0, scored.output
    assert seen == [torch.bfloat16] * 3 + [torch.float32]


def test_old_checkpoints_get_their_settings_patched(trained, tmp_path, tiny_shards):
    """A checkpoint written before unimm.json had "inference" loads with the recipe's prompt and
    length and its config's dtype; inference reads the settings, not the recipe."""
    checkpoint, _ = trained
    old = tmp_path / "old"
    shutil.copytree(checkpoint, old)
    meta = json.loads((old / "unimm.json").read_text())
    settings = meta.pop("inference")
    meta["recipe"]["model"]["system_prompt"] = "You are terse."
    (old / "unimm.json").write_text(json.dumps(meta))
    patched = read_meta(old)["inference"]
    assert patched == {**settings, "system_prompt": "You are terse."}

    # The recipe is read only to patch an old checkpoint: a current one's settings win.
    current = tmp_path / "current"
    shutil.copytree(checkpoint, current)
    meta = json.loads((current / "unimm.json").read_text())
    meta["recipe"]["model"]["system_prompt"] = "ignored by inference"
    (current / "unimm.json").write_text(json.dumps(meta))
    prompt = Session.load(current, device="cpu").collator.layout.system_prompt
    terse = Session.load(old, device="cpu").collator.layout.system_prompt
    plain = Session.load(checkpoint, device="cpu").collator.layout.system_prompt
    assert prompt == plain != terse


def test_generate_batched_with_left_padding_equals_one_at_a_time(trained, tiny_shards):
    session = Session.load(trained[0], device="cpu")
    prompts = _samples(tiny_shards, 6)
    lengths = {len(session.collator.prompt(p, after="slice").input_ids) for p in prompts}
    assert len(lengths) > 1  # padding is exercised
    batched = session.generate(prompts, after="slice", max_new_tokens=6)
    alone = [session.generate([p], after="slice", max_new_tokens=6)[0] for p in prompts]
    assert batched == alone and any(batched)
    with pytest.raises(ValueError, match="one prompt"):
        session.generate(prompts, streamer=object())
