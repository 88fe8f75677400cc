"""Model families end to end through the CLI, with tiny random models and their own processors.

LLaVA-1.5, LLaVA-NeXT (an image's token count varies with its shape), Idefics3 (tiles and marker
tokens) and PaliGemma run every command; the families not supported yet are refused with a
message, not a traceback.
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
@pytest.mark.parametrize("family", ["paligemma", "llava_next", "idefics3"])
def test_family_trains_embeds_retrieves_and_chats(folders, tiny_shards, tmp_path, lora, family):
    from unimm.data.shards import read_samples
    from unimm.inference.session import Session

    mode = ["--set", "model.lora=true", "--set", "model.train_lm=false"] if lora else []  # tiny-cpu: full
    result = _train(folders[family], tiny_shards, tmp_path / "run", *mode)
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


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3", "internvl", "mistral3", "llava_onevision"])
def test_a_family_not_supported_yet_is_refused_clearly(family):
    from test_parts import _build

    from unimm.data.collate import Collator
    from unimm.errors import UnimmError
    from unimm.model.core import RetrievalHead, UnimmModel

    model = UnimmModel(_build(family), RetrievalHead(32, 8))
    with pytest.raises(UnimmError, match=rf"model type '{family}' is not supported yet \(supported: llava, "):
        Collator.for_model(model, processor=None)


@pytest.mark.parametrize("family", ["llava", "llava_next", "idefics3"])
def test_parity_with_the_familys_own_processor_and_model(folders, family):
    """For a prompt, unimm's input ids are the processor's for the same text, and the model's logits
    from unimm's batch equal those from the processor's own outputs."""
    from PIL import Image

    from unimm.data.collate import Collator
    from unimm.data.samples import Sample, Slice
    from unimm.model.core import RetrievalHead, UnimmModel, load_mllm

    mllm, processor = load_mllm(folders[family])
    model = UnimmModel(mllm.eval(), RetrievalHead(32, 8))
    collator = Collator.for_model(model, processor)
    images = [Image.new("RGB", (64, 48), "red"), Image.new("RGB", (40, 96), (20, 200, 40))]
    sample = Sample(
        key="q", slices=[Slice.of_image(images[0]), Slice.of_text("and"), Slice.of_image(images[1])]
    )
    ours = collator.prompt(sample.replace(slices=[*sample.slices, Slice.of_text("What colour?")]))
    ph = processor.tokenizer.image_token
    text = f"{processor.tokenizer.bos_token}USER: {ph}\nand\n{ph}\nWhat colour? ASSISTANT:"
    theirs = processor(text=[text], images=[images], add_special_tokens=False, return_tensors="pt")
    assert ours.input_ids == theirs["input_ids"][0].tolist()
    batch = collator.batch([ours])
    with torch.no_grad():
        mine = mllm(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **batch["image_inputs"]
        )
        reference = mllm(**theirs)
    torch.testing.assert_close(mine.logits, reference.logits, atol=1e-5, rtol=1e-5)


def test_the_smolvlm_recipe_trains_an_idefics3_model(folders, tiny_shards, tmp_path):
    """The shipped smolvlm-256m recipe, on the tiny Idefics3 and on CPU (float32, no autocast)."""
    args = ["train", "--recipe", "smolvlm-256m", "--out", str(tmp_path / "run"), "-q"]
    overrides = [
        f"model.path={folders['idefics3']}",
        f"data.train={tiny_shards}",
        "model.dtype=float32",
        "train.mixed_precision=no",
        "train.batch_size=2",
        "train.grad_accum=1",
        "train.max_steps=2",
        "train.save_every=2",
        "data.workers=0",
    ]
    result = runner.invoke(app, [*args, *(x for o in overrides for x in ("--set", o))])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "run" / "step-000002" / "unimm.json").read_text())
    assert meta["lora"] is False and meta["recipe"]["model"]["train_lm"] is True
