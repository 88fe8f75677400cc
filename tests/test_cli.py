"""The command line: version, help, and user errors printed without a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from unimm import __version__
from unimm.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"unimm {__version__}"


def test_help_lists_only_working_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("prepare", "bench", "quickstart", "train", "embed", "retrieve", "chat", "eval"):
        assert name in result.output
    ablate = runner.invoke(app, ["eval", "--help"])
    assert ablate.exit_code == 0 and "ablate" in ablate.output


def test_eval_cli_errors_and_table(tmp_path, trained):
    checkpoint, _ = trained
    result = runner.invoke(app, ["eval"])
    assert result.exit_code == 2 and "eval.model" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["eval", "--model", str(checkpoint), "--data", str(tmp_path / "none.jsonl")])
    assert result.exit_code == 2 and "none.jsonl: no such file" in result.output
    result = runner.invoke(
        app, ["eval", "--model", str(checkpoint), "--data", "x.jsonl", "--tasks", "qa,nope"]
    )
    assert result.exit_code == 2 and "eval.tasks: unknown nope" in result.output
    result = runner.invoke(
        app,
        [
            "eval",
            "ablate",
            "--recipe",
            str(tmp_path / "r.yaml"),
            "--train",
            "s",
            "--eval",
            "e",
            "--variants",
            "joint,typo",
        ],
    )
    assert result.exit_code == 2 and "--variants: unknown typo" in result.output
    result = runner.invoke(
        app, ["eval", "ablate", "--recipe", "r.yaml", "--train", "s", "--eval", "e", "--seeds", "0,x"]
    )
    assert result.exit_code == 2 and "--seeds: give whole numbers" in result.output


def test_config_errors_are_one_message_without_traceback(tmp_path, unimm_records):
    result = runner.invoke(
        app,
        [
            "prepare",
            str(unimm_records),
            "--out",
            str(tmp_path / "o"),
            "--jpeg-quality",
            "0",
            "--set",
            "prepare.bogus=1",
            "--on-error",
            "maybe",
        ],
    )
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    for expected in (
        "prepare.bogus: unknown key",
        "prepare.on_error: expected one of",
        "prepare.jpeg_quality: must be",
    ):
        assert expected in result.output


def test_data_error_exit_code_and_success_summary(tmp_path, unimm_records):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "slices": "nope"}\n')
    result = runner.invoke(app, ["prepare", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "bad.jsonl:1: record '1': 'slices' must be a list" in result.output
    assert "Traceback" not in result.output
    ok = runner.invoke(app, ["prepare", str(unimm_records), "--out", str(tmp_path / "good"), "-q"])
    assert ok.exit_code == 0, ok.output
    assert "wrote 12 sample(s) in 1 shard(s)" in ok.output


def test_missing_teacher_folder_is_clear(tmp_path, unimm_records):
    result = runner.invoke(
        app,
        [
            "prepare",
            str(unimm_records),
            "--out",
            str(tmp_path / "o"),
            "--teacher-clip",
            str(tmp_path / "no-clip"),
            "-q",
        ],
    )
    assert result.exit_code == 2
    assert "--teacher-clip" in result.output and "not a directory" in result.output


def test_unavailable_teacher_device_is_clear(tmp_path, unimm_records, tiny_teachers):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = runner.invoke(
        app,
        [
            "prepare",
            str(unimm_records),
            "--out",
            str(tmp_path / "o"),
            "-q",
            "--teacher-clip",
            str(tiny_teachers["clip"]),
            "--device",
            "cuda",
        ],
    )
    assert (
        result.exit_code == 2 and "CUDA is not available on this machine; use --device cpu" in result.output
    )


def test_bench_data_times_each_loader_on_the_same_batches(tmp_path):
    result = runner.invoke(app, ["bench", "data", "--workers", "1,x"])
    assert result.exit_code == 2 and "--workers 1,x" in result.output and "Traceback" not in result.output
    out = tmp_path / "data.json"
    result = runner.invoke(
        app,
        [
            *("bench", "data", "--batch-size", "4", "--image-size", "56"),
            *("--batches", "2", "--workers", "2", "--json", str(out)),
        ],
    )
    assert result.exit_code == 0, result.output
    import json

    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == [
        "in the loop",
        "in the loop, data.verify=off",
        "prefetch thread",
        "2 worker processes",
    ]
    assert rows[0]["ratio"] == 1.0 and all(r["batches_per_s"] > 0 for r in rows)
    assert rows[0]["image"] == "56px, 16 tokens"  # (56 / 14)² image tokens


def test_bench_train_reports_both_variants_and_model_flops(tmp_path):
    result = runner.invoke(app, ["bench", "train", "--device", "tpu"])
    assert result.exit_code == 2 and "--device tpu" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["bench", "align", "--device", "mps"])
    assert result.exit_code == 2 and "the benches run on cpu, cuda or cuda:N" in result.output
    out = tmp_path / "train.json"
    args = ["--hidden-size", "32", "--layers", "1", "--steps", "1", "--repeats", "1", "--batch-size", "2"]
    result = runner.invoke(app, ["bench", "train", *args, "--set", "train.alpha=0", "--set", "eval.limit=1"])
    assert result.exit_code == 2 and "train.alpha: the benchmark sets it" in result.output
    assert "eval.limit: not a training key" in result.output
    args += ["--recipe", "tiny-cpu", "--set", "model.max_length=20"]  # --set reaches both (28 tokens without)
    result = runner.invoke(app, ["bench", "train", *args, "--peak-tflops", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    import json

    joint, generative = json.loads(out.read_text())
    assert (joint["variant"], generative["variant"]) == ("joint", "generative-only")
    assert joint["seq_len"] <= 20 and generative["seq_len"] <= 20
    assert generative["ratio_vs_generative_only"] == 1.0 and generative["views"] == 0 < joint["views"]
    assert joint["tokens_per_s"] == pytest.approx(joint["tokens"] / joint["step_s"], rel=0.01)
    # 6·N + 12·L·H·T per token. One Llama layer of width 32 (4 heads, 2 key/value heads, MLP width
    # 64): q and o 32², k and v 32·16 each, MLP 3·32·64, two norms 32 each; plus the final norm.
    weights = 2 * 32**2 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32 + 32
    assert joint["flops_per_token"] == 6 * weights + 12 * 1 * 32 * joint["seq_len"]
    achieved = joint["flops_per_token"] * joint["tokens"] / joint["step_s"] / 1e12
    assert joint["model_tflops_per_s"] == pytest.approx(achieved, rel=0.01, abs=1e-4)
    assert joint["mfu"] == pytest.approx(joint["model_tflops_per_s"], rel=1e-3, abs=1e-4)  # peak 1 TFLOP/s


def test_recipes_lists_prints_and_locates_the_shipped_recipes(tmp_path, monkeypatch):
    from unimm.config import SHIPPED_RECIPES, load_recipe

    root = Path(__file__).parents[1]
    assert root / "recipes" == SHIPPED_RECIPES  # a checkout reads its top-level recipes/
    monkeypatch.chdir(tmp_path)  # names work from any directory
    listed = runner.invoke(app, ["recipes"])
    assert listed.exit_code == 0, listed.output
    header, *rows = listed.output.splitlines()
    assert str(SHIPPED_RECIPES) in header
    files = sorted(SHIPPED_RECIPES.rglob("*.yaml"))
    names = [p.relative_to(SHIPPED_RECIPES).with_suffix("").as_posix() for p in files]
    assert [row.split()[0] for row in rows] == names
    tiny = next(row for row in rows if row.split()[0] == "tiny-cpu")
    assert "Tiny CPU recipe" in tiny  # each with its title, the file's first comment line

    one = runner.invoke(app, ["recipes", "tiny-cpu"])
    assert one.exit_code == 0, one.output
    where, _, text = one.output.partition("\n")
    assert where == f"# {SHIPPED_RECIPES / 'tiny-cpu.yaml'}"
    assert text == (SHIPPED_RECIPES / "tiny-cpu.yaml").read_text()
    # The printed recipe is a recipe: copied to a file, it loads as the shipped one does.
    (tmp_path / "mine.yaml").write_text(one.output)
    assert load_recipe(tmp_path / "mine.yaml") == load_recipe(SHIPPED_RECIPES / "tiny-cpu.yaml")

    path = runner.invoke(app, ["recipes", "--path", "accelerate/fsdp"])
    assert path.exit_code == 0 and path.output.strip() == str(SHIPPED_RECIPES / "accelerate" / "fsdp.yaml")
    bad = runner.invoke(app, ["recipes", "nope"])
    assert bad.exit_code == 2 and "unimm recipes nope" in bad.output and "tiny-cpu" in bad.output
    assert "Traceback" not in bad.output


@pytest.mark.parametrize("name", ["prepare", "train", "embed", "retrieve", "chat", "eval"])
def test_config_commands_leave_defaults_to_their_sections(name):
    """A flag left out is "not given": it never overrides the recipe, and its help shows the
    section's default (read from the config, so a default lives in one place)."""
    import typer

    command = typer.main.get_command(app).commands[name]  # `eval` is a group: its callback's options
    # typer may bring its own click: recognise options by their kind, not their class
    options = [p for p in command.params if p.param_type_name == "option" and p.name != "help"]
    assert len(options) >= 5, [p.name for p in options]
    for param in options:
        assert param.default in (None, False), (name, param.name, param.default)


def test_text_table_aligns_columns_and_drops_blank_ones():
    from unimm.utils import text_table

    rows = [{"variant": "joint", "ratio": 1.07, "note": None}, {"variant": "generative-only", "ratio": 1.0}]
    assert text_table(rows, ["variant", "ratio", "note"]).splitlines() == [
        "variant          ratio",
        "joint            1.07",
        "generative-only  1.0",
    ]
    assert text_table(rows, ["variant", "ratio"], right=("ratio",)).splitlines()[1:] == [
        "joint             1.07",
        "generative-only    1.0",
    ]


def test_model_dtype_flag_shows_the_sections_default():
    """`--model-dtype` is one option type for embed, retrieve, chat and eval: their sections agree."""
    from unimm.cli.options import default

    assert {default(f"{s}.model_dtype") for s in ("embed", "retrieve", "chat", "eval")} == {
        "\\[default: auto]"
    }


def test_config_show_prints_the_resolved_values_their_meanings_and_the_problems():
    from typer.testing import CliRunner

    from unimm.cli import app

    args = [
        "config",
        "show",
        "--recipe",
        "tiny-cpu",
        "--set",
        "train.hard_negatives=3",
        "--set",
        "train.lrr=1",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "  embed_dim: 64" in lines  # the recipe's value, no meaning written for it
    assert any(line.startswith("  hard_negatives: 3  # Hard negatives per pair record") for line in lines)
    assert (
        "  path: null  # Local Hugging Face image-text-to-text folder (e.g. a LLaVA-1.5 checkpoint)" in lines
    )
    assert (
        "#   - train.lrr: unknown key" in result.output and "#   - out: give a run directory" in result.output
    )
    bad = CliRunner().invoke(app, ["config", "show", "--command", "nope"])
    assert bad.exit_code != 0 and "use one of prepare, train" in bad.output


def test_quickstart_quiet_turns_the_progress_bars_off(monkeypatch):
    from typer.testing import CliRunner

    import unimm.pipelines.quickstart as quickstart
    from unimm.cli import app

    seen = {}
    monkeypatch.setattr(quickstart, "run", lambda out, **kw: seen.update(kw))
    assert CliRunner().invoke(app, ["quickstart", "-q"]).exit_code == 0
    assert seen["progress"] is False
    assert CliRunner().invoke(app, ["quickstart"]).exit_code == 0 and seen["progress"] is True


def test_eval_quiet_turns_the_progress_bars_off(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import unimm.commands.eval as evaluation
    import unimm.inference.evaluate as evaluate
    from unimm.cli import app

    seen = {}
    monkeypatch.setattr(evaluation, "run", lambda cfg, progress=True: seen.update(progress=progress) or {})
    monkeypatch.setattr(evaluate, "format_table", lambda scores: "table")
    args = ["eval", "--model", str(tmp_path), "--data", str(tmp_path / "d.jsonl"), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen["progress"] is False
