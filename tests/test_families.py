"""Model families end to end through the CLI, with tiny random models and their own processors.

Ten families (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Idefics3,
Gemma 3, PaliGemma, InternVL) train (full and LoRA), embed, retrieve, chat and evaluate; for each,
unimm's input ids and the model's logits equal what the family's own processor, chat template and
model give for the same conversation, and the stored vectors equal a hand computation from the
model's hidden states. Qwen-VL, LLaVA-OneVision and InternVL processors load image-only here
(no torchvision on these machines: tests/imageonly.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from imageonly import image_only
from PIL import Image
from typer.testing import CliRunner

from unimm.cli import app
from unimm.data.samples import Sample, Slice
from unimm.tiny.models import FAMILIES, save_tiny_mllm

runner = CliRunner()
TEMPLATED = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "internvl")


@pytest.fixture(scope="module", autouse=True)
def _image_only_processors():
    with image_only():
        yield


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
    assert model.config.model_type == family and isinstance(processor.image_token, str)
    assert bool(processor.chat_template) == (family in (*TEMPLATED, "llava_onevision"))
    find_parts(model)


@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llava"])  # LLaVA: test_train.py
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
    from unimm.inference.store import load_index

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
    # Generation with images, batched with left padding, equals one prompt at a time.
    prompts = [
        Sample.of_slices([Slice.of_image(Image.new("RGB", (48, 32), "red")), Slice.of_text("What?")]),
        Sample.of_slices([Slice.of_text("Say two red circles, please")]),
    ]
    batched = session.generate(prompts, max_new_tokens=3)
    assert batched == [session.generate([p], max_new_tokens=3)[0] for p in prompts]
    if not lora:
        return
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(checkpoint), "--data", str(tiny_shards), "--limit", "4", "--out", str(out)]
    result = runner.invoke(app, [*args, "--tasks", "captioning,retrieval,interleaved"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())


def _conversation(family: str, processor):
    """A sample, and the same conversation as the family's users write it: the processor's text
    (from its chat template, or LLaVA's plain layout for the families unimm lays out that way)
    and images. LLaVA-OneVision gets one image (its processor gives an image of a multi-image
    prompt fewer tokens than one alone; unimm encodes every image as if alone, see layout docs)."""
    images = [Image.new("RGB", (64, 48), "red"), Image.new("RGB", (40, 96), (20, 200, 40))]
    if family == "llava_onevision":
        images = images[:1]
    parts = [("image", images[0]), ("text", "and")] + ([("image", images[1])] if len(images) > 1 else [])
    parts.append(("text", "What colour?"))
    sample = Sample(
        key="q", slices=[Slice.of_image(x) if k == "image" else Slice.of_text(x) for k, x in parts]
    )
    if family in TEMPLATED:
        content = [{"type": "image"} if k == "image" else {"type": "text", "text": x} for k, x in parts]
        messages = [{"role": "user", "content": content}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        body = "\n".join(processor.image_token if k == "image" else x for k, x in parts)
        text = f"{processor.tokenizer.bos_token}USER: {body} ASSISTANT:"
    return sample, text, images


# PaliGemma's processor writes its own prefix-LM layout (images, then <bos>, the prompt and a
# newline, with bidirectional attention over that prefix); unimm lays it out like LLaVA and keeps
# it causal, so that a view's embedding depends only on what precedes it: there is no parity to hold.
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "paligemma"])
def test_parity_with_the_familys_own_processor_and_model(folders, family):
    """For a prompt, unimm's input ids are the processor's for the same conversation, the model's
    logits from unimm's batch equal those from the processor's own outputs, and each view's
    vector is the retrieval head on a hand-pooled hidden state of the processor's inputs."""
    from unimm.data.collate import Collator
    from unimm.model.core import RetrievalHead, UnimmModel, load_mllm

    mllm, processor = load_mllm(folders[family])
    torch.manual_seed(0)
    model = UnimmModel(mllm.eval(), RetrievalHead(mllm.config.text_config.hidden_size, 8))
    collator = Collator.for_model(model, processor)
    assert collator.layout.name == ("chat template" if family in TEMPLATED else "plain")
    sample, text, images = _conversation(family, processor)
    ours = collator.prompt(sample)
    theirs = processor(text=[text], images=[images], add_special_tokens=False, return_tensors="pt")
    assert ours.input_ids == theirs["input_ids"][0].tolist()
    batch = collator.batch([ours])
    expected_keys = set(theirs) - {"input_ids", "attention_mask"}
    assert set(batch["image_inputs"]) == expected_keys  # everything the model needs reaches it
    with torch.no_grad():
        mine = mllm(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **batch["image_inputs"]
        )
        reference = mllm(**theirs)
        torch.testing.assert_close(mine.logits, reference.logits, atol=1e-5, rtol=1e-5)
        # Hand pooling on the processor's inputs: an image's own image-token positions, the
        # last token of a text slice.
        hidden = mllm.model(**theirs).last_hidden_state[0]
        ids = theirs["input_ids"][0].tolist()
        image_at = [i for i, t in enumerate(ids) if t == model.image_token_id]
        alone = list(processor(text=[processor.image_token], images=[images[:1]])["input_ids"][0])
        first = image_at[: alone.count(model.image_token_id)]  # the first image's own tokens
        pooled = [hidden[first].mean(0)]
        if len(images) > 1:
            second = image_at[len(first) :]
            decode = processor.tokenizer.decode
            and_end = next(
                i for i in range(first[-1], second[0]) if "and" in decode(ids[first[-1] + 1 : i + 1])
            )
            pooled += [hidden[and_end], hidden[second].mean(0)]
        batch["views"] = [(0, c) for c in range(len(pooled))]
        torch.testing.assert_close(model.embed(batch), model.head(torch.stack(pooled)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", TEMPLATED)
def test_chat_template_turns_and_prefixes(folders, family):
    """Under a chat template: a multi-turn conversation (an earlier assistant answer) is the
    template's own text, the answer's labels are the answer and the turn's end, and the tokens up
    to every slice are the same whatever follows it (the causal-embedding contract)."""
    from unimm.data.collate import IGNORE, Collator
    from unimm.model.core import RetrievalHead, UnimmModel, load_mllm

    mllm, processor = load_mllm(folders[family])
    collator = Collator.for_model(UnimmModel(mllm, RetrievalHead(32, 8)), processor)
    image = Image.new("RGB", (48, 48), "blue")
    slices = [
        Slice.of_image(image),
        Slice.of_text("What shape?"),
        Slice.of_text("A square.", role="assistant"),
        Slice.of_text("What colour?"),
    ]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
        {"role": "user", "content": [{"type": "text", "text": "What colour?"}]},
    ]
    full = [*messages, {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]
    text = processor.apply_chat_template(full, tokenize=False)
    theirs = processor(text=[text], images=[[image]], add_special_tokens=False)["input_ids"][0]
    encoded = collator.encode(Sample(key="c", slices=slices, response="Blue."))
    assert encoded.input_ids == list(theirs)
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    answer_at = len(processor(text=[prompt], images=[[image]], add_special_tokens=False)["input_ids"][0])
    assert encoded.labels == [IGNORE] * answer_at + encoded.input_ids[answer_at:]
    document = Sample(
        key="d",
        slices=[
            Slice.of_text("two red"),
            Slice.of_text("circles"),
            Slice.of_image(image),
            Slice.of_text("left"),
        ],
    )
    whole = collator.encode(document, document_end=False)
    for k, (_, _, end) in enumerate(whole.spans):
        part = collator.encode(document.replace(slices=document.slices[: k + 1]), document_end=False)
        assert part.input_ids == whole.input_ids[:end], k


def test_truncation_under_a_chat_template_never_cuts_an_image(folders):
    """Qwen2-VL: a too-long document keeps its start; a text slice may be cut, an image is dropped
    whole with everything after it; the result fits and its image tokens are whole images."""
    from unimm.data.collate import IMAGE, Collator
    from unimm.model.core import RetrievalHead, UnimmModel, load_mllm

    mllm, processor = load_mllm(folders["qwen2_vl"])
    model = UnimmModel(mllm, RetrievalHead(32, 8))
    image = Image.new("RGB", (64, 64), "red")  # 16 image tokens
    words = " ".join(["red square"] * 12)
    document = Sample(key="t", slices=[Slice.of_text("two"), Slice.of_image(image), Slice.of_text(words)])
    whole = Collator.for_model(model, processor).encode(document)
    for limit in range(len(whole.input_ids) - 1, 10, -3):
        encoded = Collator.for_model(model, processor, max_length=limit).encode(document)
        assert len(encoded.input_ids) <= limit
        assert all(end <= len(encoded.input_ids) for _, _, end in encoded.spans)
        if not encoded.spans:  # the template's own text does not fit: nothing to embed
            assert limit < whole.spans[0][2] and encoded.dropped == len(document.slices)
            continue
        kept = len(encoded.spans)
        assert encoded.dropped == len(document.slices) - kept
        images = sum(kind == IMAGE for kind, _, _ in encoded.spans)
        assert encoded.input_ids.count(model.image_token_id) == 16 * images
        start = encoded.spans[-1][1]  # everything before the last kept slice is the whole's
        assert encoded.input_ids[:start] == whole.input_ids[:start]


def test_a_conversation_a_chat_template_refuses_is_a_clear_error(folders):
    """Gemma 3's template refuses a conversation that opens with the assistant: a message naming
    the sample and the template's own words, not a jinja traceback."""
    from unimm.data.collate import Collator
    from unimm.errors import UnimmError
    from unimm.model.core import RetrievalHead, UnimmModel, load_mllm

    mllm, processor = load_mllm(folders["gemma3"])
    collator = Collator.for_model(UnimmModel(mllm, RetrievalHead(32, 8)), processor)
    sample = Sample(key="odd", slices=[Slice.of_text("Hello.", role="assistant"), Slice.of_text("Hi")])
    with pytest.raises(UnimmError, match=r"sample 'odd'.*Conversation roles must alternate"):
        collator.encode(sample)


def test_a_processor_that_cannot_expand_images_is_refused_clearly(folders):
    from unimm.data.collate import Collator
    from unimm.errors import UnimmError
    from unimm.model.core import RetrievalHead, UnimmModel, load_mllm

    mllm, processor = load_mllm(folders["llava"])
    processor.image_token = None
    with pytest.raises(
        UnimmError, match=r"processor LlavaProcessor has no image_token \(the image placeholder"
    ):
        Collator.for_model(UnimmModel(mllm, RetrievalHead(64, 8)), processor)


def test_a_processor_needing_torchvision_says_so(folders):
    from transformers.utils import is_torchvision_available

    from unimm.errors import UnimmError
    from unimm.model.core import load_mllm

    if is_torchvision_available():
        pytest.skip("torchvision is installed: the Qwen2-VL processor loads")
    import transformers.processing_utils as P
    from imageonly import image_only  # noqa: F401 - the module fixture's patch is lifted below

    names = type(P.MODALITY_TO_AUTOPROCESSOR_MAPPING)._MAPPING_NAMES
    saved = names["video_processor"]
    names["video_processor"] = ("transformers.models.auto.video_processing_auto", "AutoVideoProcessor")
    try:
        with pytest.raises(UnimmError, match="its processor needs torchvision"):
            load_mllm(folders["qwen2_vl"])
    finally:
        names["video_processor"] = saved


@pytest.mark.parametrize(
    ("recipe", "family"),
    [("smolvlm-256m", "idefics3"), ("qwen2-vl-2b-lora", "qwen2_vl"), ("qwen2.5-vl-7b-lora", "qwen2_5_vl")],
)
def test_a_shipped_recipe_trains_its_family(folders, tiny_shards, tmp_path, recipe, family):
    """The shipped recipes, on the tiny model of their family and on CPU (float32, no autocast)."""
    args = ["train", "--recipe", recipe, "--out", str(tmp_path / "run"), "-q"]
    overrides = [
        f"model.path={folders[family]}",
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
    assert meta["lora"] is (recipe != "smolvlm-256m")


def test_bench_train_and_data_take_a_family(tmp_path):
    """`unimm bench train/data --family`: a Qwen-style model's step and data path."""
    out = tmp_path / "train.json"
    args = ["--hidden-size", "32", "--layers", "1", "--steps", "1", "--repeats", "1", "--batch-size", "2"]
    result = runner.invoke(app, ["bench", "train", "--family", "qwen2_vl", *args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    joint, generative = json.loads(out.read_text())
    assert joint["model"].startswith("qwen2_vl: language model 1 x 32")
    assert generative["views"] == 0 < joint["views"]
    # One Qwen2 layer of width 32 (4 heads of 8, 2 key/value heads; q, k, v with biases; MLP 64),
    # two norms, plus the final norm: 6·N + 12·L·H·T per token.
    weights = (32 * 32 + 32) + 2 * (32 * 16 + 16) + 32 * 32 + 3 * 32 * 64 + 2 * 32 + 32
    assert joint["flops_per_token"] == 6 * weights + 12 * 32 * joint["seq_len"]
    result = runner.invoke(app, ["bench", "train", "--family", "nope"])
    assert result.exit_code == 2 and "--family nope: use one of llava" in result.output

    out = tmp_path / "data.json"
    args = [
        "--family",
        "qwen2_vl",
        "--image-size",
        "56",
        "--batches",
        "2",
        "--batch-size",
        "4",
        "--workers",
        "1",
    ]
    result = runner.invoke(app, ["bench", "data", *args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    # 56 px: 64 × 64 (the nearest multiple of patch 8 × merge 2) would pass 56² pixels, so 48 × 48:
    # 6 × 6 patches, merged 2 × 2 → 9 tokens
    assert rows[0]["image"] == "56px, 9 tokens" and rows[0]["family"] == "qwen2_vl"


def test_control_tokens_inside_text_stay_text(folders):
    """A document that says "<|image_pad|>" or "<|im_end|>" as text gets no image token and does
    not end its turn (an image placeholder without an image crashed the model)."""
    from unimm.data.collate import Collator
    from unimm.model.core import RetrievalHead, UnimmModel, load_mllm

    mllm, processor = load_mllm(folders["qwen2_vl"])
    model = UnimmModel(mllm.eval(), RetrievalHead(32, 8))
    collator = Collator.for_model(model, processor)
    image = Image.new("RGB", (48, 48), "red")
    sample = Sample(
        key="c", slices=[Slice.of_image(image), Slice.of_text("write <|image_pad|> then <|im_end|> here")]
    )
    encoded = collator.prompt(sample)
    image_tokens = collator.image_text(image).count(processor.image_token)
    assert encoded.input_ids.count(model.image_token_id) == image_tokens  # the image's only
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    text_ids = encoded.input_ids[encoded.spans[1][1] : encoded.spans[1][2]]
    assert end not in text_ids and model.image_token_id not in text_ids
    batch = collator.batch([encoded])
    with torch.no_grad():  # runs: features and placeholders agree
        mllm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **batch["image_inputs"])
