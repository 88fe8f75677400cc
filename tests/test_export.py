"""`unimm export`: sentence-transformers loads the folder and encodes as `unimm embed`; the merged
folder is a plain transformers model (and still a unimm checkpoint)."""

from __future__ import annotations

import json

import pytest
import torch

from unimm.config import ExportOptions
from unimm.errors import UnimmError
from unimm.inference.export import export

st = pytest.importorskip("sentence_transformers")


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    checkpoint, _ = trained
    out = tmp_path_factory.mktemp("export") / "st"
    export(ExportOptions(model=str(checkpoint), out=str(out)))
    return out


def test_sentence_transformers_encode_equals_unimm_embed(tmp_path, trained, exported, image_dir):
    """Text, an image, a captioned image and an interleaved conversation: ``encode`` gives the
    vectors `unimm embed` stores for the same documents (written as records here)."""
    from PIL import Image

    from unimm.commands.embed import run
    from unimm.config import EmbedConfig, build_config
    from unimm.inference.store import load_index

    checkpoint, _ = trained
    records = [
        {"id": "t", "slices": [{"text": "two red circles"}]},
        {"id": "i", "slices": [{"image": "imgs/1.jpg"}]},
        {"id": "c", "slices": [{"image": "imgs/2.jpg"}, {"text": "a caption"}]},
        {"id": "m", "slices": [{"text": "step one"}, {"image": "imgs/3.jpg"}, {"text": "step two"}]},
    ]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    options = {"embed.model": str(checkpoint), "embed.data": [str(data)], "embed.out": str(tmp_path / "i")}
    run(build_config(EmbedConfig, options=options | {"embed.dtype": "float32"}), progress=False)
    stored, _, _ = load_index(tmp_path / "i")

    model = st.SentenceTransformer(str(exported), trust_remote_code=True, device="cpu")
    image = {i: Image.open(image_dir / f"{i}.jpg") for i in (1, 2, 3)}
    inputs = [
        "two red circles",
        image[1],
        {"image": image[2], "text": "a caption"},
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "step one"},
                    {"type": "image", "image": str(image_dir / "3.jpg")},
                    {"type": "text", "text": "step two"},
                ],
            }
        ],
    ]
    got = torch.stack([torch.from_numpy(model.encode([x])[0]) for x in inputs])
    torch.testing.assert_close(got, stored, atol=1e-5, rtol=1e-5)
    batched = torch.from_numpy(model.encode(inputs[:3], batch_size=3))
    torch.testing.assert_close(batched, stored[:3], atol=1e-5, rtol=1e-5)
    assert model.get_embedding_dimension() == stored.shape[1]


def test_the_export_is_checked_and_refuses_clobbering(tmp_path, trained, exported):
    checkpoint, _ = trained
    with pytest.raises(UnimmError, match="not empty; pass --overwrite"):
        export(ExportOptions(model=str(checkpoint), out=str(exported)))
    with pytest.raises(UnimmError, match="this command's input"):
        export(ExportOptions(model=str(checkpoint), out=str(checkpoint)))
    with pytest.raises(UnimmError, match="not a unimm checkpoint"):
        export(ExportOptions(model=str(tmp_path), out=str(tmp_path / "x")))
    with pytest.raises(UnimmError, match="hf-merged"):
        export(ExportOptions(model=str(checkpoint), out=str(tmp_path / "y"), format="onnx"))
    assert json.loads((exported / "unimm-export.json").read_text())["format"] == "sentence-transformers"


def test_hf_merged_is_a_plain_transformers_folder(tmp_path, tiny_shards):
    """A LoRA checkpoint, merged: loaded by transformers alone (no peft, no unimm), the same
    logits as the unimm checkpoint with its adapters; as a unimm checkpoint, the same vectors."""
    from pathlib import Path

    from transformers import AutoModelForImageTextToText

    from unimm.commands.train import run as train
    from unimm.config import TrainConfig, build_config
    from unimm.data.samples import Sample, Slice
    from unimm.inference.session import Session

    recipe = Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml"
    overrides = [
        f"data.train={tiny_shards}",
        "train.max_steps=2",
        "train.save_every=2",
        "train.warmup_ratio=0",
    ]
    overrides += ["model.lora=true", "model.train_lm=false", "model.lora_r=4", "model.lora_alpha=8"]
    cfg = build_config(
        TrainConfig, recipe=recipe, options={"out": str(tmp_path / "run")}, overrides=overrides
    )
    train(cfg, progress=False)
    checkpoint = tmp_path / "run" / "step-000002"
    assert (checkpoint / "adapter").is_dir()
    out = tmp_path / "merged"
    export(ExportOptions(model=str(checkpoint), out=str(out), format="hf-merged"))
    assert not (out / "adapter").exists() and (out / "README.md").is_file()
    plain = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True).eval()
    session = Session.load(checkpoint)
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        want = session.model.mllm(input_ids=ids).logits
        with session.model.mllm.disable_adapter():
            base = session.model.mllm(input_ids=ids).logits
        assert (base - want).abs().max() > 1e-3  # the adapters matter, so a merge can be told apart
        torch.testing.assert_close(plain(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    docs = [Sample.of_slices([Slice.of_text("two red circles")])]
    torch.testing.assert_close(
        Session.load(out).embed_views(docs), session.embed_views(docs), atol=1e-5, rtol=1e-5
    )
