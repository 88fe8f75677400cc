"""Collation (exact tokens, labels, spans) and the model core (pooling, losses) on a tiny LLaVA."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from unimm.data.collate import IGNORE, IMAGE, TEXT, Collator
from unimm.data.samples import Sample, Slice
from unimm.model.core import RetrievalHead, UnimmModel, load_mllm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from unimm.tiny import save_tiny_llava

    folder = save_tiny_llava(tmp_path_factory.mktemp("llava"), ["a red square", "two blue circles"])
    model, processor = load_mllm(folder)
    return folder, model.eval(), processor


def collator(processor, model, **kwargs):
    return Collator(
        processor.tokenizer,
        image_token_id=model.config.image_token_index,
        image_seq_length=16,
        image_processor=processor.image_processor,
        **kwargs,
    )


def sample(slices, response=None, key="k"):
    out = [Slice.of_text(s) if isinstance(s, str) else Slice.of_image(s) for s in slices]
    return Sample(key=key, slices=out, response=response)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _processor_ids(processor, text: str, images=None) -> list[int]:
    """The family's own processor on the whole text (the oracle for input ids)."""
    out = processor(text=[text], images=[images] if images else None, add_special_tokens=False)
    return [int(i) for i in out["input_ids"][0]]


def test_tokens_labels_and_spans_exact(tiny):
    """The ids are the processor's for the rendered conversation; spans and labels are exact."""
    _, model, processor = tiny
    tok = processor.tokenizer
    col = collator(processor, model, system_prompt="Be brief.")
    image = Image.new("RGB", (40, 40), "red")
    enc = col.encode(sample([image, "What colour?"], response="Red."))
    prompt = "<s>Be brief. USER: <image>\nWhat colour? ASSISTANT:"
    assert enc.input_ids == _processor_ids(processor, prompt + " Red.</s>", [image])
    answer_at = len(_processor_ids(processor, prompt, [image]))
    assert enc.labels == [IGNORE] * answer_at + enc.input_ids[answer_at:]  # only the answer is learned
    image_id = model.config.image_token_index
    first = enc.input_ids.index(image_id)
    question = len(_processor_ids(processor, "<s>Be brief. USER: <image>\n", [image]))
    assert enc.spans == [
        (IMAGE, first, first + 16),
        (TEXT, question, question + len(ids(tok, "What colour?"))),
    ]
    assert set(enc.input_ids[first : first + 16]) == {image_id}
    # without a response every text-slice token is learned, and the document's closing </s>
    plain = col.encode(sample(["Hello there", image, "bye"]))
    text = "<s>Be brief. USER: Hello there\n<image>\nbye</s>"
    assert plain.input_ids == _processor_ids(processor, text, [image])
    learned = [plain.input_ids[k] for k, lab in enumerate(plain.labels) if lab != IGNORE]
    spans = [plain.input_ids[a:b] for kind, a, b in plain.spans if kind == TEXT]
    assert learned == spans[0] + spans[1] + [tok.eos_token_id]
    assert tok.decode(spans[0]).strip() == "Hello there" and tok.decode(spans[1]).strip() == "bye"
    assert plain.input_ids[-1] == tok.eos_token_id and plain.spans[-1][2] == len(plain.input_ids) - 1


def test_every_view_prefix_is_the_tokens_of_that_prefix_alone(tiny):
    """The causal-embedding contract: the tokens up to a view's cut do not depend on what follows."""
    _, model, processor = tiny
    col = collator(processor, model)
    image = Image.new("RGB", (32, 32), "blue")
    slices = ["two red circles", image, "Then, one blue square.", "Finally, three green triangles."]
    full = col.encode(sample(slices))
    for k, (_, _, end) in enumerate(full.spans):
        alone = col.prompt(sample(slices[: k + 1]), after="slice")
        assert full.input_ids[:end] == alone.input_ids[:end], k


def test_prefix_does_not_depend_on_the_response(tiny):
    _, model, processor = tiny
    col = collator(processor, model)
    with_answer = col.encode(sample(["a red square"], response="yes"))
    without = col.encode(sample(["a red square"]))
    end = with_answer.spans[-1][2]
    assert with_answer.input_ids[:end] == without.input_ids[:end]


def test_truncation_never_cuts_an_image(tiny):
    _, model, processor = tiny
    image = Image.new("RGB", (32, 32), "blue")
    first_text = collator(processor, model).encode(sample(["a red square"]))
    limit = len(first_text.input_ids) + 10  # room for less than one image (16 tokens)
    col = collator(processor, model, max_length=limit)
    enc = col.encode(sample(["a red square", image, "after"]))
    assert [s[0] for s in enc.spans] == [
        TEXT
    ]  # the image (16 tokens) did not fit: dropped, with what follows
    assert enc.dropped == 2 and len(enc.input_ids) <= limit and not enc.images
    long = col.encode(sample(["word " * 50]))
    assert len(long.input_ids) == limit and long.dropped == 0  # a text slice may be cut short
    assert long.input_ids[-1] != processor.tokenizer.eos_token_id  # a cut document has no end mark


def test_cut_points_reproducible_and_include_last(tiny):
    _, model, processor = tiny
    col = collator(processor, model, cut_points=3, seed=7)
    enc = col.encode(sample([f"slice {i}" for i in range(8)], key="doc-9"))
    cuts = col.cuts(enc)
    assert len(cuts) == 3 and cuts[-1] == 7 and cuts == sorted(cuts)
    assert col.cuts(enc) == cuts  # same key, same views
    other = collator(processor, model, cut_points=3, seed=8).cuts(enc)
    assert other[-1] == 7


@pytest.mark.parametrize("pooling", ["paper", "last"])
def test_pooled_embeddings_equal_manual_computation(tiny, pooling):
    _, model, processor = tiny
    torch.manual_seed(0)
    head = RetrievalHead(model.config.text_config.hidden_size, 24)
    core = UnimmModel(model, head, pooling=pooling).eval()
    col = collator(processor, model, cut_points=4)
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "green")]
    batch = col(
        [
            sample(["a red square", images[0], "two blue circles"], key="a"),
            sample([images[1], "x"], response="y", key="b"),
        ]
    )
    with torch.no_grad():
        out = core(batch)
        full = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            **batch["image_inputs"],
            output_hidden_states=True,
        )
    hidden = full.hidden_states[-1]
    manual = []
    for b, cut in batch["views"]:
        kind, start, end = batch["spans"][b][cut]
        if kind == IMAGE and pooling == "paper":
            manual.append(hidden[b, start:end].mean(0))
        else:
            manual.append(hidden[b, end - 1])
    manual = torch.stack(manual)
    torch.testing.assert_close(out.pooled, manual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.embeddings, torch.nn.functional.normalize(head(manual), dim=-1))
    assert torch.allclose(out.embeddings.norm(dim=-1), torch.ones(len(batch["views"])))
    # the generative loss equals cross-entropy of the full logits on the labelled tokens
    logits = full.logits[:, :-1]
    target = batch["labels"][:, 1:]
    want = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE
    )
    torch.testing.assert_close(out.loss_gen, want, atol=1e-5, rtol=1e-5)


def test_image_pooling_is_over_that_images_own_tokens(tiny):
    """Images of different token counts, with marker tokens around them inside their spans (as
    Gemma 3, Idefics3 and Qwen-VL lay them out): each mean is over its own image tokens only."""
    _, model, _ = tiny
    core = UnimmModel(model, RetrievalHead(model.config.text_config.hidden_size, 8), pooling="paper")
    image, other = core.image_token_id, core.image_token_id + 1
    ids = torch.full((2, 12), other)
    ids[0, 2:5] = image  # span 1..6: marker, 3 image tokens, marker
    ids[1, 3:8] = image  # span 3..8: 5 image tokens
    ids[1, 9] = image  # a later image's token, outside the span
    spans = [[(IMAGE, 1, 6), (TEXT, 6, 9)], [(TEXT, 0, 3), (IMAGE, 3, 8)]]
    views = [(0, 0), (1, 1), (0, 1)]
    hidden = torch.randn(2, 12, 4)
    got = core.pool(hidden, spans, views, ids)
    want = torch.stack([hidden[0, 2:5].mean(0), hidden[1, 3:8].mean(0), hidden[0, 8]])
    torch.testing.assert_close(got, want)


def test_load_errors_are_clear(tmp_path):
    from unimm.errors import UnimmError

    with pytest.raises(UnimmError, match=r"no config\.json"):
        load_mllm(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llava", "text_config": {"vocab_size": -3}}')
    with pytest.raises(UnimmError, match=r"cannot load it as an image-text-to-text model \(\w+"):
        load_mllm(tmp_path)


def test_generation_prompt_has_no_document_end(tiny):
    """A prompt to generate from is the training prefix up to `` ASSISTANT:`` (or the slice
    separator), with no ``</s>`` in between: the document-end token is for finished documents."""
    _, model, processor = tiny
    col = collator(processor, model)
    tok = processor.tokenizer
    image = Image.new("RGB", (32, 32), "red")
    trained = col.encode(sample([image, "What colour?"], response="Red."))
    answer_at = next(k for k, lab in enumerate(trained.labels) if lab != IGNORE)
    prompt = col.prompt(sample([image, "What colour?"]), after="assistant")
    assert prompt.input_ids == trained.input_ids[:answer_at]  # exactly the trained prefix
    assert prompt.input_ids == _processor_ids(processor, "<s>USER: <image>\nWhat colour? ASSISTANT:", [image])
    assert tok.eos_token_id not in prompt.input_ids and set(prompt.labels) == {IGNORE}
    document = col.encode(sample([image, "a red square"]))
    caption = col.prompt(sample([image]), after="slice")
    assert caption.input_ids == document.input_ids[: len(caption.input_ids)]  # the caption follows
