"""`unimm mine`: hard negatives from an index, checked against brute-force scores; planted false
negatives dropped; resume; inputs never overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_image, write_jsonl

from unimm.errors import UnimmError

CAPTIONS = [
    "two red circles on the left",
    "one blue square on the top",
    "three green triangles on the right",
    "one yellow circle on the bottom",
    "two blue triangles on the left",
    "three red squares on the top",
]


def _corpus(tmp_path):
    """Documents: each caption, a planted near-duplicate of the first three (an unlabelled
    positive), and images."""
    for i in range(3):
        make_image(tmp_path / "imgs" / f"{i}.jpg", colour=(40 * i, 200 - 40 * i, 90))
    rows = [{"id": f"doc-{i}", "slices": [{"text": c}]} for i, c in enumerate(CAPTIONS)]
    rows += [{"id": f"dup-{i}", "slices": [{"text": "the " + CAPTIONS[i]}]} for i in range(3)]
    rows += [{"id": f"img-{i}", "slices": [{"image": f"imgs/{i}.jpg"}]} for i in range(3)]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", rows)
    pairs = [
        {"id": f"q{i}", "query": [{"text": f"find {CAPTIONS[i]}"}], "positive": [{"text": CAPTIONS[i]}]}
        for i in range(3)
    ]
    return corpus, write_jsonl(tmp_path / "pairs.jsonl", pairs), rows


def _doc_id(side: list[dict], rows: list[dict]) -> str:
    """The corpus document a mined side was written from (by its one slice)."""
    (found,) = [r["id"] for r in rows if r["slices"] == side]
    return found


def _mine_config(checkpoint, index, pairs, out, **extra):
    from unimm.config import MineConfig, build_config

    options = {
        "mine.model": str(checkpoint),
        "mine.index": str(index),
        "mine.pairs": str(pairs),
        "mine.out": str(out),
        "mine.negatives": 2,
        "mine.device": "cpu",
    }
    return build_config(MineConfig, options=options | {f"mine.{k}": v for k, v in extra.items()})


@pytest.fixture
def mined_setup(tmp_path, trained):
    from unimm.commands.embed import run as embed
    from unimm.config import EmbedConfig, build_config

    checkpoint, shard_index = trained
    corpus, pairs, rows = _corpus(tmp_path)
    options = {
        "embed.model": str(checkpoint),
        "embed.data": [str(corpus)],
        "embed.out": str(tmp_path / "index"),
        "embed.dtype": "float32",
    }
    embed(build_config(EmbedConfig, options=options), progress=False)
    return checkpoint, tmp_path / "index", pairs, rows, shard_index


def _expected(checkpoint, rows, margin: float, count: int, rows_folder):
    """By brute force: every document scored against each query, best first; the query's own
    positive and anything scoring above the positive-aware threshold left out."""
    from unimm.data.adapters import open_image
    from unimm.data.samples import Sample, Slice
    from unimm.inference.session import Session

    session = Session.load(checkpoint, device="cpu")
    folder = Path(rows_folder)

    def document(row):
        slice_ = row["slices"][0]
        if "text" in slice_:
            return Sample.of_slices([Slice.of_text(slice_["text"])])
        return Sample.of_slices([Slice.of_image(open_image(folder / slice_["image"]))])

    docs = rows
    doc_vectors = session.embed_views([document(r) for r in docs])  # texts and images alike
    expected, planted_dropped = {}, {}
    for i in range(3):
        q = session.embed_views([Sample.of_slices([Slice.of_text(f"find {CAPTIONS[i]}")])], role="query")[0]
        p = session.embed_views([Sample.of_slices([Slice.of_text(CAPTIONS[i])])])[0]
        s_pos = float(q @ p)
        threshold = s_pos - (1 - margin) * abs(s_pos)
        scored = sorted(
            ((float(q @ v), r["id"]) for v, r in zip(doc_vectors, docs, strict=True)), reverse=True
        )
        kept = [(s, d) for s, d in scored if d != f"doc-{i}" and s <= threshold]
        expected[f"q{i}"] = [d for _, d in kept[:count]]
        planted_dropped[f"q{i}"] = dict((d, s) for s, d in scored)[f"dup-{i}"] > threshold
    return expected, planted_dropped


def test_mining_returns_exactly_the_brute_force_negatives_without_planted_false_negatives(
    mined_setup, tmp_path
):
    from unimm.inference.mining import mine

    checkpoint, index, pairs, rows, _ = mined_setup
    expected, planted = _expected(checkpoint, rows, 0.95, 2, index.parent)
    assert all(planted.values()), planted  # the near-duplicates score above the threshold: the test bites
    summary = mine(_mine_config(checkpoint, index, pairs, tmp_path / "mined.jsonl").mine, progress=False)
    assert summary["records"] == 3 and summary["dropped_false_negatives"] >= 3
    out = [json.loads(line) for line in (tmp_path / "mined.jsonl").read_text().splitlines()]
    for record in out:
        got = [_doc_id(side, rows) for side in record["negatives"]]
        assert got == expected[record["id"]], record["id"]
        assert f"dup-{record['id'][1:]}" not in got
        assert len(record["meta"]["mined"]["scores"]) == 2
    # a margin of 1 drops only what scores above the positive itself
    expected_loose, _ = _expected(checkpoint, rows, 1.0, 2, index.parent)
    mine(_mine_config(checkpoint, index, pairs, tmp_path / "loose.jsonl", margin=1.0).mine, progress=False)
    loose = [json.loads(line) for line in (tmp_path / "loose.jsonl").read_text().splitlines()]
    assert [[_doc_id(s, rows) for s in r["negatives"]] for r in loose] == list(expected_loose.values())


def test_mining_resumes_after_the_last_complete_record_and_never_overwrites(mined_setup, tmp_path):
    from unimm.inference.mining import mine

    checkpoint, index, pairs, _, shard_index = mined_setup
    full = tmp_path / "full.jsonl"
    mine(_mine_config(checkpoint, index, pairs, full, batch_size=1).mine, progress=False)
    lines = full.read_text().splitlines(keepends=True)
    out = tmp_path / "resumed.jsonl"
    (tmp_path / ".resumed.jsonl.partial").write_text(lines[0] + lines[1][:17])  # killed mid-line
    summary = mine(
        _mine_config(checkpoint, index, pairs, out, batch_size=1, resume=True).mine, progress=False
    )
    assert summary["resumed_at"] == 1 and out.read_text() == full.read_text()
    with pytest.raises(UnimmError, match="input"):
        mine(_mine_config(checkpoint, index, pairs, pairs, overwrite=True).mine, progress=False)
    with pytest.raises(UnimmError, match="exists"):
        mine(_mine_config(checkpoint, index, pairs, full).mine, progress=False)
    with pytest.raises(UnimmError, match="prepared shards"):
        mine(_mine_config(checkpoint, shard_index, pairs, tmp_path / "x.jsonl").mine, progress=False)
    assert not (tmp_path / "x.jsonl").exists()


def test_the_cli_without_the_filter_mines_naive_top_k_planted_false_negatives_included(mined_setup, tmp_path):
    from typer.testing import CliRunner

    from unimm.cli import app

    checkpoint, index, pairs, rows, _ = mined_setup
    out = tmp_path / "naive.jsonl"
    args = [
        "mine",
        "--model",
        str(checkpoint),
        "--index",
        str(index),
        "--pairs",
        str(pairs),
        "--out",
        str(out),
        "--negatives",
        "2",
        "--no-filter",
        "--device",
        "cpu",
        "-q",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (
        "mined 6 negatives for 3 records" in result.output
        and "0 likely false negatives dropped" in result.output
    )
    expected, _ = _expected(checkpoint, rows, float("inf"), 2, index.parent)
    text_to_id = {r["slices"][0].get("text"): r["id"] for r in rows}
    got = {
        r["id"]: [text_to_id[n[0]["text"]] for n in r["negatives"]]
        for r in map(json.loads, out.read_text().splitlines())
    }
    assert got == expected
    assert all(f"dup-{q[1:]}" in negatives for q, negatives in got.items())  # naive top-k takes them
    bad = CliRunner().invoke(app, [*args[:-4], "--margin", "1.5"])
    assert bad.exit_code != 0 and "mine.margin: must be in (0, 1]" in bad.output
