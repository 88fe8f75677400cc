"""`unimm retrieve` end to end: a document as its own query ranks first; interleaved queries; errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from unimm.cli import app
from unimm.commands.retrieve import query_order, run
from unimm.config import RetrieveConfig, build_config
from unimm.errors import UnimmError

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml"


@pytest.fixture
def setup(trained, tiny_shards):
    """The shared tiny checkpoint, its float32 index, and the shards (see conftest)."""
    return (*trained, tiny_shards)


def retrieve(checkpoint, index, **options):
    opts = {"retrieve.model": str(checkpoint), "retrieve.index": str(index)}
    opts.update({f"retrieve.{k}": v for k, v in options.items()})
    return run(build_config(RetrieveConfig, options=opts))


def test_documents_as_queries_find_themselves(tmp_path, setup):
    """A query with a document's own slices embeds exactly like it: R@1 = 1 with qrels."""
    from unimm.data.shards import read_samples

    checkpoint, index, shards = setup
    (tmp_path / "images").mkdir()
    queries, qrels = [], []
    for n, sample in enumerate(read_samples(shards, split_by_node=False, split_by_worker=False)):
        if n >= 6:
            break
        slices = []
        for k, s in enumerate(sample.slices):
            if s.kind == "text":
                slices.append({"text": s.text})
            else:
                name = f"images/{n}-{k}.png"
                s.image.save(tmp_path / name)
                slices.append({"image": name})
        queries.append({"id": f"q{n}", "slices": slices})
        qrels.append({"query_id": f"q{n}", "doc_id": sample.id, "relevance": 1})
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (tmp_path / "qrels.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qrels))
    result = retrieve(
        checkpoint,
        index,
        queries=str(tmp_path / "q.jsonl"),
        qrels=str(tmp_path / "qrels.jsonl"),
        top_k=5,
        out=str(tmp_path / "res.jsonl"),
        metrics_out=str(tmp_path / "m.json"),
    )
    assert result["metrics"]["recall@1"] == 1.0 and result["metrics"]["mrr"] == 1.0
    assert all(r["scores"][0] == pytest.approx(1.0, abs=1e-4) for r in result["results"])
    lines = [json.loads(x) for x in (tmp_path / "res.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and len(lines[0]["ids"]) == 5
    assert json.loads((tmp_path / "m.json").read_text())["queries"] == 6


def test_interleaved_cli_query_in_order(tmp_path, setup):
    from PIL import Image

    checkpoint, index, _ = setup
    Image.new("RGB", (32, 32), "red").save(tmp_path / "q.png")
    argv = [
        "retrieve",
        "--model",
        str(checkpoint),
        "--index",
        str(index),
        "--query",
        "look:",
        "--image",
        str(tmp_path / "q.png"),
        "--query",
        "and this",
        "--top-k",
        "3",
    ]
    assert query_order(argv) == [["text", "look:"], ["image", str(tmp_path / "q.png")], ["text", "and this"]]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert result.output.count("+0.") + result.output.count("-0.") == 3


def test_clear_errors(tmp_path, setup):
    checkpoint, index, _ = setup
    with pytest.raises(UnimmError, match=r"no manifest\.json"):
        retrieve(checkpoint, tmp_path, query=[["text", "x"]])
    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    meta = json.loads((other / "unimm.json").read_text())
    meta["step"] = 999
    (other / "unimm.json").write_text(json.dumps(meta))
    with pytest.raises(UnimmError, match="embedded with another model"):
        retrieve(other, index, query=[["text", "x"]])
    odd = tmp_path / "odd-index"
    shutil.copytree(index, odd)
    manifest = json.loads((odd / "manifest.json").read_text())
    manifest["dim"] = 7
    (odd / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnimmError, match="dimension mismatch"):
        retrieve(checkpoint, odd, query=[["text", "x"]])
    with pytest.raises(UnimmError, match="cannot read it"):
        retrieve(checkpoint, index, query=[["image", str(tmp_path / "missing.png")]])
    with pytest.raises(UnimmError, match="the text is empty"):
        retrieve(checkpoint, index, query=[["text", "  "]])
    result = CliRunner().invoke(app, ["retrieve", "--model", str(checkpoint), "--index", str(index)])
    assert result.exit_code == 2 and "give a query" in result.output


def test_gak_rerank_permutes_the_first_stage(tmp_path, setup):
    from unimm.commands.embed import run as embed
    from unimm.config import EmbedConfig
    from unimm.data.shards import read_samples

    checkpoint, _, shards = setup
    embed(
        build_config(
            EmbedConfig,
            options={
                "embed.model": str(checkpoint),
                "embed.data": [str(shards)],
                "embed.out": str(tmp_path / "idx"),
                "embed.per_slice": True,
                "embed.dtype": "float32",
            },
        ),
        progress=False,
    )
    sample = next(iter(read_samples(shards, split_by_node=False, split_by_worker=False)))
    query = []
    for n, s in enumerate(sample.slices):
        if s.kind == "text":
            query.append(["text", s.text])
        else:
            s.image.save(tmp_path / f"q{n}.png")
            query.append(["image", str(tmp_path / f"q{n}.png")])
    first = retrieve(checkpoint, tmp_path / "idx", query=query, top_k=5)["results"][0]
    reranked = retrieve(checkpoint, tmp_path / "idx", query=query, top_k=5, rerank="gak")["results"][0]
    assert sorted(reranked["ids"]) == sorted(first["ids"])  # a re-ordering of the same candidates
    assert reranked["ids"][0] == sample.id and reranked["scores"][0] == pytest.approx(1.0, abs=1e-4)
    assert reranked["scores"] == sorted(reranked["scores"], reverse=True)
    with pytest.raises(UnimmError, match="--per-slice"):
        retrieve(checkpoint, setup[1], query=query, rerank="gak")


def test_retrieve_and_chat_take_recipe_and_set(tmp_path, setup):
    """Every option of retrieve/chat is a config key: --set reaches keys without a flag (block),
    a recipe's section applies, and a flag given on the command line wins over the recipe."""
    checkpoint, index, _ = setup
    runner = CliRunner()
    base = ["retrieve", "--model", str(checkpoint), "--index", str(index), "--query", "red"]

    def ranked(output: str) -> list[str]:
        return [line.split()[-1] for line in output.splitlines() if line.startswith("    ")]

    plain = runner.invoke(app, [*base, "--top-k", "5"])
    blocked = runner.invoke(app, [*base, "--top-k", "5", "--set", "retrieve.block=3"])
    assert plain.exit_code == 0 and blocked.exit_code == 0, blocked.output
    assert len(ranked(plain.output)) == 5 and ranked(blocked.output) == ranked(
        plain.output
    )  # blocks are exact
    bad = runner.invoke(app, [*base, "--set", "retrieve.block=0"])
    assert bad.exit_code == 2 and "retrieve.top_k and retrieve.block must be >= 1" in bad.output

    recipe = tmp_path / "r.yaml"
    recipe.write_text("retrieve:\n  top_k: 2\nchat:\n  max_new_tokens: 3\n")
    assert len(ranked(runner.invoke(app, [*base, "--recipe", str(recipe)]).output)) == 2
    assert len(ranked(runner.invoke(app, [*base, "--recipe", str(recipe), "--top-k", "4"]).output)) == 4

    chat = ["chat", "--model", str(checkpoint), "--prompt", "What colour?", "--recipe", str(recipe)]
    said = runner.invoke(app, chat)
    assert said.exit_code == 0, said.output
    wrong = runner.invoke(app, [*chat, "--set", "chat.top_p=0"])
    assert wrong.exit_code == 2 and "chat.top_p" in wrong.output and "Traceback" not in wrong.output
