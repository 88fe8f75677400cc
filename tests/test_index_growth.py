"""`unimm embed` on record files, `--append`, and the saved ANN index (`unimm index build`)."""

from __future__ import annotations

import json

import pytest
import torch

from unimm.commands.embed import run
from unimm.config import EmbedConfig, IndexOptions, build_config
from unimm.errors import UnimmError
from unimm.inference.ann import Searcher, read_ann_manifest
from unimm.inference.ann_build import build_ann
from unimm.inference.search import exact_search
from unimm.inference.store import load_index


@pytest.fixture
def checkpoint(trained):
    return trained[0]


def embed(out, checkpoint, data, **options):
    opts = {"embed.model": str(checkpoint), "embed.data": [str(d) for d in data], "embed.out": str(out)}
    opts.update({f"embed.{k}": v for k, v in options.items()})
    return run(build_config(EmbedConfig, options=opts), progress=False)


@pytest.fixture
def captions(tmp_path, image_dir):
    """A CSV of image captions (6 rows) next to its images."""
    lines = ["id,image,caption"] + [f"c{i},imgs/{i}.jpg,a photo of colour {i}" for i in range(6)]
    path = tmp_path / "captions.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_csv_of_captions_embeds_directly(tmp_path, checkpoint, captions, image_dir):
    """Each vector is the session's own embedding of the record (opened independently here), and
    the row carries the record, so the document reads back without the CSV."""
    from PIL import Image

    from unimm.data.samples import Sample, Slice
    from unimm.inference.documents import load_document
    from unimm.inference.session import Session

    manifest = embed(tmp_path / "idx", checkpoint, [captions], dtype="float32")
    vectors, rows, _ = load_index(tmp_path / "idx")
    assert manifest["count"] == 6 and [r["id"] for r in rows] == [f"c{i}" for i in range(6)]
    assert rows[2]["source"] == f"{captions}:4"
    session = Session.load(checkpoint)
    want = session.embed_views(
        [
            Sample.of_slices(
                [
                    Slice.of_image(Image.open(image_dir / f"{i}.jpg").convert("RGB")),
                    Slice.of_text(f"a photo of colour {i}"),
                ]
            )
            for i in range(6)
        ]
    )
    torch.testing.assert_close(vectors, want, atol=1e-5, rtol=1e-5)
    captions.unlink()
    doc = load_document(rows[3], manifest["data"])
    assert doc.kinds() == ["image", "text"] and doc.texts() == ["a photo of colour 3"]
    assert doc.slices[0].image.size == Image.open(image_dir / "3.jpg").size


def test_record_images_stay_under_the_image_root(tmp_path, checkpoint, image_dir):
    bad = tmp_path / "bad.csv"
    bad.write_text("image,caption\nimgs/0.jpg,fine\n../../etc/passwd,escapes\n")
    with pytest.raises(UnimmError, match=rf"{bad}:3: .*outside the image root"):
        embed(tmp_path / "idx", checkpoint, [bad])
    manifest = embed(tmp_path / "skip", checkpoint, [bad], on_error="skip")
    assert manifest["count"] == 1 and manifest["rejected"] == 1
    assert "outside the image root" in manifest["rejected_reasons"][0]
    with pytest.raises(UnimmError, match=r"--image-root .*: not a directory"):
        embed(tmp_path / "idx2", checkpoint, [bad], image_root=str(tmp_path / "none"))


def test_append_equals_embedding_everything_at_once(tmp_path, checkpoint, unimm_records):
    lines = unimm_records.read_text().splitlines()
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("\n".join(lines[:7]) + "\n")
    second.write_text("\n".join(lines[7:]) + "\n")
    embed(tmp_path / "all", checkpoint, [first, second], dtype="float32")
    embed(tmp_path / "grown", checkpoint, [first], dtype="float32", part_size=3)
    older = json.loads((tmp_path / "grown" / "manifest.json").read_text())
    del older["runs"]  # as an index written before runs were counted
    (tmp_path / "grown" / "manifest.json").write_text(json.dumps(older))
    manifest = embed(tmp_path / "grown", checkpoint, [second], dtype="float32", append=True, part_size=3)
    assert manifest["count"] == 12 and manifest["added"] == 5 and manifest["runs"] == 2
    assert [p["name"] for p in manifest["parts"][-2:]] == ["embeddings-01-00000", "embeddings-01-00001"]
    a, rows_a, _ = load_index(tmp_path / "all")
    b, rows_b, _ = load_index(tmp_path / "grown")
    torch.testing.assert_close(b, a)
    assert [r["id"] for r in rows_b] == [r["id"] for r in rows_a]

    before = (tmp_path / "grown" / "manifest.json").read_bytes()
    with pytest.raises(UnimmError, match=r"id 'r7' is already in the index"):
        embed(tmp_path / "grown", checkpoint, [second], dtype="float32", append=True)
    assert (tmp_path / "grown" / "manifest.json").read_bytes() == before  # the index is unchanged
    with pytest.raises(UnimmError, match="--dtype"):
        embed(tmp_path / "grown", checkpoint, [second], append=True)
    with pytest.raises(UnimmError, match="no finished index to add to"):
        embed(tmp_path / "new", checkpoint, [second], append=True)
    with pytest.raises(UnimmError, match="--append"):
        embed(tmp_path / "all", checkpoint, [second], dtype="float32")  # neither append nor overwrite


def test_an_ann_index_is_saved_reused_and_grows(tmp_path, checkpoint, unimm_records):
    """HNSW over a small index finds the exact top-k; `--append` adds to it (no rebuild); a
    re-embedded index refuses the stale ANN index."""
    from unimm.inference.session import Session

    lines = unimm_records.read_text().splitlines()
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("\n".join(lines[:8]) + "\n")
    second.write_text("\n".join(lines[8:]) + "\n")
    out = tmp_path / "idx"
    embed(out, checkpoint, [first], dtype="float32")
    ann = build_ann(IndexOptions(index=str(out), backend="faiss-hnsw"))
    assert ann["count"] == 8 and (out / "ann" / ann["file"]).is_file()
    embed(out, checkpoint, [second], dtype="float32", append=True)
    grown = read_ann_manifest(out)
    assert grown["count"] == 12 and grown["file"] != ann["file"]
    assert not (out / "ann" / ann["file"]).exists()

    vectors, _, _ = load_index(out)
    dim = Session.load(checkpoint).model.head.embed_dim
    searcher = Searcher(out, model=checkpoint, dim=dim)
    assert searcher.backend == "faiss-hnsw" and searcher.embeddings is None
    hits = searcher.search(vectors, 4)
    scores, found = exact_search(vectors, vectors, 4)
    assert [[r for r, _ in h] for h in hits] == found.tolist()
    torch.testing.assert_close(torch.tensor([[s for _, s in h] for h in hits]), scores, atol=1e-5, rtol=0)
    assert Searcher(out, model=checkpoint, dim=dim, backend="exact").backend == "exact"

    state = json.loads((out / "ann" / "ann.json").read_text())
    state["embeddings_hash"] = "0" * 64
    (out / "ann" / "ann.json").write_text(json.dumps(state))
    with pytest.raises(UnimmError, match="unimm index build --index"):
        Searcher(out, model=checkpoint, dim=dim)
    embed(out, checkpoint, [first], dtype="float32", overwrite=True)
    assert read_ann_manifest(out) is None
    with pytest.raises(UnimmError, match="has no ANN index"):
        Searcher(out, model=checkpoint, dim=dim, backend="ann")


@pytest.mark.parametrize("backend", ["faiss-flat", "faiss-ivfpq"])
def test_other_backends(tmp_path, backend):
    """Built over synthetic unit vectors without a model: flat is exact; IVF-PQ with every list
    probed ranks the true neighbour first for most queries (its codes are approximate)."""
    from safetensors.torch import save_file

    from unimm.inference.ann import open_ann

    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(16, 64, generator=gen), dim=1)
    data = centres.repeat(40, 1) + 0.2 * torch.randn(640, 64, generator=gen)
    data = torch.nn.functional.normalize(data, dim=1)
    save_file({"embeddings": data}, tmp_path / "embeddings-00000.safetensors")
    (tmp_path / "embeddings-00000.json").write_text(
        json.dumps({"rows": [{"id": str(i)} for i in range(640)]})
    )
    (tmp_path / "manifest.json").write_text(
        json.dumps({"kind": "unimm-index", "parts": [{"name": "embeddings-00000", "count": 640}], "dim": 64})
    )
    ann = build_ann(IndexOptions(index=str(tmp_path), backend=backend, nprobe=64))
    index = open_ann(tmp_path, ann)
    _, rows = index.search(data[:100].numpy(), 1)
    hit = (torch.from_numpy(rows[:, 0]) == torch.arange(100)).float().mean().item()
    if backend == "faiss-flat":
        assert hit == 1.0 and ann["bytes_per_vector"] >= 4 * 64
    else:
        assert ann["params"]["pq_m"] == 16 and index.code_size == 16  # d/4 bytes per vector, plus its id
        assert hit >= 0.5  # 4-byte codes for 64-d vectors near 16 centres


def test_retrieve_through_reranked_ivfpq_equals_exact_search(tmp_path, trained):
    """The searcher retrieve, chat and serve use, over IVF-PQ whose candidates are every
    document, re-scored from the stored vectors: exact search's results, scores included."""
    import shutil

    from unimm.data.samples import Sample, Slice
    from unimm.inference.session import Session

    checkpoint, built = trained
    index = tmp_path / "index"
    shutil.copytree(built, index)
    count = json.loads((index / "manifest.json").read_text())["count"]
    ann = build_ann(
        IndexOptions(index=str(index), backend="faiss-ivfpq", nprobe=64, rerank=count), progress=False
    )
    assert ann["params"]["rerank"] == count
    session = Session.load(checkpoint)
    texts = ["red circles", "a blue square", "two shapes", "green"]
    queries = session.embed_views([Sample.of_slices([Slice.of_text(t)]) for t in texts], role="query")
    exact = Searcher.for_session(index, session, checkpoint, backend="exact").search(queries, 5)
    reranked = Searcher.for_session(index, session, checkpoint, backend="ann")
    assert reranked.backend == "faiss-ivfpq" and reranked.rerank == count
    for got, want in zip(reranked.search(queries, 5), exact, strict=True):
        assert [r for r, _ in got] == [r for r, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-5)


def test_the_cli_builds_an_hnsw_index_that_retrieve_reuses(tmp_path, checkpoint, captions):
    """A new user's path: embed a CSV of captions, build HNSW once, retrieve with it (no rebuild:
    retrieve reports the saved back end); bad input gets one line and exit code 2."""
    import shutil

    from typer.testing import CliRunner

    from unimm.cli import app

    runner = CliRunner()
    index = tmp_path / "idx"
    shutil.copy(captions, tmp_path / "copy.csv")
    result = runner.invoke(
        app, ["embed", "--model", str(checkpoint), "--data", str(captions), "--out", str(index), "-q"]
    )
    assert result.exit_code == 0 and "embedded 6 documents" in result.output, result.output
    result = runner.invoke(app, ["index", "build", "--index", str(index), "--backend", "faiss-hnsw"])
    assert result.exit_code == 0 and "built faiss-hnsw over 6 vectors" in result.output, result.output
    result = runner.invoke(
        app, ["retrieve", "--model", str(checkpoint), "--index", str(index), "--query", "colour 3"]
    )
    assert result.exit_code == 0 and "(faiss-hnsw search)" in result.output and "c3" in result.output
    result = runner.invoke(app, ["index", "build", "--index", str(index), "--backend", "annoy"])
    assert result.exit_code == 2 and "index.backend" in result.output and "Traceback" not in result.output
    result = runner.invoke(
        app,
        [
            "embed",
            "--model",
            str(checkpoint),
            "--data",
            str(tmp_path / "copy.csv"),
            "--out",
            str(index),
            "--append",
        ],
    )
    assert result.exit_code == 2 and "already in the index" in result.output, result.output
