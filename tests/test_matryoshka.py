"""Matryoshka embeddings: trained sizes recorded in the checkpoint, the loss averaged over them,
and every shorter vector served (``embed --dim``, search over a shorter index, ``dimensions`` on
``/v1/embeddings``) equal to the full vector cut and re-normalised; other sizes refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml"


@pytest.fixture(scope="module")
def nested(tmp_path_factory, tiny_shards) -> Path:
    """A tiny checkpoint (2 steps, embed_dim 64) trained for the sizes 64, 32 and 16."""
    from unimm.commands.train import run
    from unimm.config import TrainConfig, build_config

    root = tmp_path_factory.mktemp("nested")
    overrides = [
        f"data.train={tiny_shards}",
        "train.max_steps=2",
        "train.save_every=2",
        "model.matryoshka=[32,16]",
    ]
    run(
        build_config(TrainConfig, recipe=RECIPE, options={"out": str(root / "run")}, overrides=overrides),
        progress=False,
    )
    return root / "run" / "step-000002"


def _cut(vectors: torch.Tensor, d: int) -> torch.Tensor:
    part = vectors[:, :d].double()
    return (part / part.norm(dim=1, keepdim=True)).float()


def test_the_loss_is_the_mean_over_the_trained_sizes():
    from unimm.config import TrainConfig, build_config
    from unimm.model.targets import same_sample_mask, view_targets
    from unimm.training.losses import discriminative_loss, structure_loss

    torch.manual_seed(0)
    views = [(0, 0), (0, 1), (1, 0), (2, 0)]
    teacher = [
        {"u": torch.randn(n, 8), "v": torch.randn(n, 8), "modality": torch.zeros(n, dtype=torch.long)}
        for n in (2, 1, 1)
    ]
    emb = torch.nn.functional.normalize(torch.randn(4, 64), dim=1)
    cfg = build_config(
        TrainConfig,
        options={"out": "x"},
        overrides=["model.tiny=true", "data.train=x", "model.embed_dim=64", "model.matryoshka=[16,8]"],
    )
    targets, same = view_targets(teacher, views, cfg.align), same_sample_mask(views)
    want = [
        discriminative_loss(
            _cut(emb, d), targets, same, kind=cfg.train.disc_loss, temperature=cfg.train.temperature
        )
        for d in (64, 16, 8)
    ]
    assert float(structure_loss(emb, teacher, views, cfg)) == pytest.approx(float(sum(want) / 3), rel=1e-5)
    with pytest.raises(Exception, match=r"model\.matryoshka: different sizes each between 1 and"):
        build_config(
            TrainConfig,
            options={"out": "x"},
            overrides=["model.tiny=true", "data.train=x", "model.embed_dim=64", "model.matryoshka=[64]"],
        )


def test_embed_dim_search_and_serve_give_the_cut_full_vector(nested, tiny_shards, tmp_path):
    from unimm.commands.embed import run as embed
    from unimm.config import EmbedConfig, build_config
    from unimm.data.samples import Sample, Slice
    from unimm.errors import UnimmError
    from unimm.inference.ann import Searcher
    from unimm.inference.session import Session
    from unimm.model.checkpoint import read_meta
    from unimm.utils import read_safetensors

    assert read_meta(nested)["inference"]["dimensions"] == [64, 32, 16]
    opts = {"embed.model": str(nested), "embed.data": [str(tiny_shards)], "embed.dtype": "float32"}
    embed(build_config(EmbedConfig, options={**opts, "embed.out": str(tmp_path / "full")}), progress=False)
    manifest = embed(
        build_config(EmbedConfig, options={**opts, "embed.out": str(tmp_path / "d16"), "embed.dim": 16}),
        progress=False,
    )
    assert manifest["dim"] == 16
    full = torch.cat(
        [
            read_safetensors(p)["embeddings"]
            for p in sorted((tmp_path / "full").glob("embeddings-*.safetensors"))
        ]
    )
    short = torch.cat(
        [
            read_safetensors(p)["embeddings"]
            for p in sorted((tmp_path / "d16").glob("embeddings-*.safetensors"))
        ]
    )
    torch.testing.assert_close(short, _cut(full, 16), atol=1e-6, rtol=1e-5)
    with pytest.raises(UnimmError, match="embedding size 48: this checkpoint was trained for 64, 32, 16"):
        Session.load(nested, device="cpu", dim=48)
    # a query against the 16-d index: the full model's query vector, cut; ranked by brute force
    session = Session.load(nested, device="cpu")
    query = session.embed_views([Sample.of_slices([Slice.of_text("two red circles")])])
    (hits,) = Searcher(tmp_path / "d16", model=nested, dim=64, backend="exact").search(query, 3)
    scores = short @ _cut(query, 16)[0]
    assert [r for r, _ in hits] == torch.argsort(scores, descending=True)[:3].tolist()
    assert [s for _, s in hits] == pytest.approx(
        torch.sort(scores, descending=True).values[:3].tolist(), abs=1e-5
    )


def test_served_dimensions(nested):
    pytest.importorskip("fastapi")
    import json
    import urllib.error
    import urllib.request

    from unimm.config import ServeOptions
    from unimm.inference.serving import Background, build_state

    def post(url: str, body: dict):
        request = urllib.request.Request(
            url + "/v1/embeddings", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request) as response:
            return json.loads(response.read())

    state = build_state(ServeOptions(model=str(nested), name="n"))
    with Background(state) as url:
        full = torch.tensor(post(url, {"input": ["two red circles"]})["data"][0]["embedding"])
        short = torch.tensor(
            post(url, {"input": ["two red circles"], "dimensions": 32})["data"][0]["embedding"]
        )
        torch.testing.assert_close(short, _cut(full[None], 32)[0], atol=1e-6, rtol=1e-5)
        with pytest.raises(urllib.error.HTTPError) as err:
            post(url, {"input": ["x"], "dimensions": 48})
        assert err.value.code == 400 and "trained for 64, 32, 16" in err.value.read().decode()


def test_the_sentence_transformers_export_truncates_as_embed_dim_does(nested, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from unimm.config import ExportOptions
    from unimm.data.samples import Sample, Slice
    from unimm.inference.export import export
    from unimm.inference.session import Session

    export(ExportOptions(model=str(nested), out=str(tmp_path / "st")))
    model = st.SentenceTransformer(
        str(tmp_path / "st"), trust_remote_code=True, device="cpu", truncate_dim=16
    )
    got = model.encode(["two red circles"], normalize_embeddings=True, convert_to_tensor=True)
    want = Session.load(nested, device="cpu", dim=16).embed_views(
        [Sample.of_slices([Slice.of_text("two red circles")])]
    )
    torch.testing.assert_close(got.cpu().float(), want, atol=1e-5, rtol=1e-4)


def test_a_size_above_the_models_is_a_clear_error(nested, tiny_shards, tmp_path):
    from typer.testing import CliRunner

    from unimm.cli import app

    args = [
        "embed",
        "--data",
        str(tiny_shards),
        "--model",
        str(nested),
        "--out",
        str(tmp_path / "i"),
        "--dim",
        "128",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "embedding size 128: this checkpoint was trained for 64, 32, 16" in result.output
    assert not (tmp_path / "i" / "manifest.json").exists()
