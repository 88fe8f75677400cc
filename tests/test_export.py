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


def test_hf_merged_carries_a_chat_template_and_a_model_card(tmp_path, trained):
    """A model without a chat template of its own (the tiny LLaVA) is exported with unimm's plain
    layout as one: ``apply_chat_template`` renders exactly what unimm's layout renders (the
    oracle), tokenizes to the prompt unimm generates from, and ``pipeline("image-text-to-text")``
    answers what ``unimm chat`` answers. The card names the base, the data and the losses."""
    from PIL import Image
    from transformers import AutoProcessor, pipeline

    from unimm.data.layout import PLAIN_TEMPLATE_MARK, PlainLayout
    from unimm.data.samples import Sample, Slice
    from unimm.inference.session import Session
    from unimm.model.checkpoint import read_meta

    checkpoint, _ = trained
    out = tmp_path / "merged"
    export(ExportOptions(model=str(checkpoint), out=str(out), format="hf-merged"))
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    assert processor.chat_template.startswith(PLAIN_TEMPLATE_MARK)
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    layout = PlainLayout(processor.tokenizer, processor.image_token)
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image"},
                {"type": "text", "text": "Which colour?"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": "And its shape?"},
    ]
    slices = [
        Slice.of_text("look"),
        Slice.of_image(image),
        Slice.of_text("Which colour?"),
        Slice.of_text("red", role="assistant"),
        Slice.of_text("And its shape?"),
    ]
    rendered = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert rendered == layout.render(slices, None, ending="assistant", system="Answer briefly.").text
    closed = processor.apply_chat_template(conversation[1:3], tokenize=False)
    assert closed == layout.render(slices[:3], "red").text  # a trained answer, as training saw it

    session = Session.load(out)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "Which colour?"}],
        }
    ]
    sample = Sample.of_slices([Slice.of_image(image), Slice.of_text("Which colour?")])
    ids = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert list(ids["input_ids"][0]) == session.collator.prompt(sample).input_ids
    chat = pipeline("image-text-to-text", model=str(out))
    answer = chat(text=messages, max_new_tokens=6)[0]["generated_text"][-1]["content"]
    assert answer.strip() == session.generate([sample], max_new_tokens=6)[0]

    card = (out / "README.md").read_text()
    meta = read_meta(checkpoint)
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n")
    assert meta["data_manifests"][0][:16] in card and "tiny random LLaVA" in card
    assert f"alpha {meta['recipe']['train']['alpha']}" in card and 'pipeline("image-text-to-text"' in card
    assert "No evaluation was recorded" in card
    st_out = tmp_path / "st"
    export(ExportOptions(model=str(checkpoint), out=str(st_out)))
    st_card = (st_out / "README.md").read_text()
    assert "library_name: sentence-transformers" in st_card and "SentenceTransformer(" in st_card
    assert (st_out / "checkpoint" / "chat_template.jinja").is_file()
