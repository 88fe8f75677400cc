"""Task instructions: stored with the checkpoint, applied identically by embed, retrieve, serve
and the sentence-transformers export (vectors equal); asymmetric query/document; bad names."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import write_jsonl

from unimm.errors import UnimmError

QUERY_TEXT, DOCUMENT_TEXT = "Find the document that answers this.", "Represent this document."
TEXTS = ["two red circles on the left", "one blue square on the top"]


@pytest.fixture(scope="module")
def instructed(trained, tmp_path_factory):
    """The trained checkpoint with a ``find`` task as its default (its ``inference`` settings as
    a recipe's ``model.instructions`` writes them)."""
    folder = tmp_path_factory.mktemp("instructed") / "step"
    shutil.copytree(trained[0], folder)
    meta = json.loads((folder / "unimm.json").read_text())
    meta["inference"]["instructions"] = {"find": {"query": QUERY_TEXT, "document": DOCUMENT_TEXT}}
    meta["inference"]["default_instruction"] = "find"
    (folder / "unimm.json").write_text(json.dumps(meta))
    return folder


def _samples(texts=TEXTS, **fields):
    from unimm.data.samples import Sample, Slice

    return [Sample.of_slices([Slice.of_text(t)], **fields) for t in texts]


def test_the_instruction_is_the_system_text_and_queries_differ_from_documents(instructed):
    from unimm.data.samples import Slice
    from unimm.inference.session import Session, embed_last_views

    session = Session.load(instructed, device="cpu")
    documents = session.embed_views(_samples())
    queries = session.embed_views(_samples(), role="query")
    by_hand, _ = embed_last_views(session.model, session.collator, _samples(instruction=DOCUMENT_TEXT))
    torch.testing.assert_close(documents, by_hand)
    assert not torch.allclose(documents, queries, atol=1e-4)  # asymmetric
    bare = Session.load(instructed, device="cpu", instruction="").embed_views(_samples())
    assert not torch.allclose(documents, bare, atol=1e-4)
    # the instruction is rendered before the slices, and is not a slice (no span, no cut)
    encoded = session.collator.encode(_samples(instruction=DOCUMENT_TEXT)[0])
    text = session.tokenizer.decode(encoded.input_ids)
    assert text.index(DOCUMENT_TEXT) < text.index(TEXTS[0]) and len(encoded.spans) == 1
    # generation keeps the system prompt: a chat prompt is not a retrieval query
    prompt = session.collator.prompt(_samples(instruction="")[0])
    assert DOCUMENT_TEXT not in session.tokenizer.decode(prompt.input_ids)
    assert Slice.of_text("x").text == "x"


def test_embed_serve_and_the_export_give_the_evaluated_vectors(instructed, tmp_path):
    pytest.importorskip("fastapi")
    st = pytest.importorskip("sentence_transformers")
    import urllib.request

    from unimm.commands.embed import run as embed
    from unimm.config import EmbedConfig, ExportOptions, ServeOptions, build_config
    from unimm.inference.export import export
    from unimm.inference.serving import Background, build_state
    from unimm.inference.session import Session

    session = Session.load(instructed, device="cpu")
    documents, queries = session.embed_views(_samples()), session.embed_views(_samples(), role="query")
    # unimm embed
    records = write_jsonl(
        tmp_path / "docs.jsonl", [{"id": f"d{i}", "slices": [{"text": t}]} for i, t in enumerate(TEXTS)]
    )
    options = {
        "embed.model": str(instructed),
        "embed.data": [str(records)],
        "embed.out": str(tmp_path / "index"),
        "embed.dtype": "float32",
    }
    manifest = embed(build_config(EmbedConfig, options=options), progress=False)
    from safetensors.torch import load_file

    (part,) = sorted((tmp_path / "index").glob("embeddings-*.safetensors"))
    torch.testing.assert_close(load_file(part)["embeddings"], documents, atol=1e-6, rtol=1e-5)
    assert json.loads((tmp_path / "index" / "manifest.json").read_text())["instruction"] == "find"

    # unimm serve
    def post(url, body):
        request = urllib.request.Request(
            url + "/v1/embeddings", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request) as response:
            return torch.tensor([d["embedding"] for d in json.loads(response.read())["data"]])

    with Background(build_state(ServeOptions(model=str(instructed), name="m"))) as url:
        torch.testing.assert_close(post(url, {"input": TEXTS}), documents, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            post(url, {"input": TEXTS, "input_type": "query"}), queries, atol=1e-6, rtol=1e-5
        )
    # the sentence-transformers export: encode() documents, encode_query() queries
    export(ExportOptions(model=str(instructed), out=str(tmp_path / "st")))
    model = st.SentenceTransformer(str(tmp_path / "st"), trust_remote_code=True, device="cpu")
    torch.testing.assert_close(
        model.encode(TEXTS, convert_to_tensor=True).float(), documents, atol=1e-5, rtol=1e-4
    )
    got = model.encode_query(TEXTS, convert_to_tensor=True).float()
    torch.testing.assert_close(got, queries, atol=1e-5, rtol=1e-4)
    assert manifest is not None


def test_unknown_instruction_tasks_and_mismatched_indexes_are_clear_errors(instructed, tmp_path):
    from unimm.config import TrainConfig, build_config
    from unimm.inference.ann import Searcher
    from unimm.inference.session import Session

    with pytest.raises(
        UnimmError,
        match=r"--instruction: instruction task 'vqa' is not in model\.instructions \(known: find\)",
    ):
        Session.load(instructed, device="cpu", instruction="vqa")
    with pytest.raises(UnimmError, match=r"model\.instructions\.find: unknown key\(s\) qurey"):
        build_config(
            TrainConfig,
            options={"out": "x"},
            overrides=["model.tiny=true", "model.instructions={find: {qurey: a}}"],
        )
    with pytest.raises(UnimmError, match="default_instruction: 'vqa' is not a task"):
        build_config(
            TrainConfig, options={"out": "x"}, overrides=["model.tiny=true", "model.default_instruction=vqa"]
        )
    from unimm.commands.embed import run as embed
    from unimm.config import EmbedConfig

    records = write_jsonl(tmp_path / "docs.jsonl", [{"id": "d", "slices": [{"text": "x"}]}])
    options = {
        "embed.model": str(instructed),
        "embed.data": [str(records)],
        "embed.out": str(tmp_path / "bare"),
        "embed.instruction": "",
    }
    embed(build_config(EmbedConfig, options=options), progress=False)
    with pytest.raises(UnimmError, match="embedded under instruction task '', the queries' is 'find'"):
        Searcher(tmp_path / "bare", model=instructed, dim=64, instruction="find")
