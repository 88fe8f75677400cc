"""Outputs never clobber inputs: each command refuses an output that holds another command's
artefacts or its own input, before any work, and leaves every file as it was."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from unimm.cli import app

runner = CliRunner()


def _fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def artefacts(trained, tiny_shards, tmp_path):
    """Copies of prepared shards, an index and a run (with its checkpoint), to try to clobber."""
    checkpoint, index = trained
    shards = shutil.copytree(tiny_shards, tmp_path / "shards")
    index = shutil.copytree(index, tmp_path / "index")
    run = shutil.copytree(checkpoint.parent, tmp_path / "run")
    return {"shards": shards, "index": index, "run": run, "checkpoint": run / checkpoint.name}


def _cases(a: dict, records: Path) -> list[tuple[list[str], str]]:
    model = str(a["checkpoint"])
    return [
        (
            ["embed", "--model", model, "--data", str(a["shards"]), "--out", str(a["shards"])],
            "is (or holds) this command's input",
        ),
        (
            ["prepare", str(records), "--out", str(a["run"]), "--overwrite"],
            "holds a training run",
        ),
        (
            ["embed", "--model", model, "--data", str(a["shards"]), "--out", str(a["checkpoint"])],
            "this command's input",
        ),
        (["prepare", str(records), "--out", str(a["index"])], "holds an index (`unimm embed`)"),
        (["prepare", str(records), "--out", str(a["index"]), "--overwrite"], "holds an index"),
        (["prepare", str(records), "--out", str(records.parent)], "this command's input"),
        (
            [
                "train",
                "--recipe",
                "tiny-cpu",
                "--set",
                f"data.train={a['shards']}",
                "--out",
                str(a["shards"]),
            ],
            "this command's input",
        ),
        (
            ["train", "--recipe", "tiny-cpu", "--set", f"data.train={a['shards']}", "--out", str(a["index"])],
            "holds an index",
        ),
        (
            ["eval", "--model", model, "--data", str(records), "--out", str(a["shards"] / "manifest.json")],
            "holds prepared shards",
        ),
        (
            [
                "retrieve",
                "--model",
                model,
                "--index",
                str(a["index"]),
                "--query",
                "red",
                "--out",
                str(a["index"] / "manifest.json"),
            ],
            "this command's input",
        ),
        (["bench", "align", "--quick", "--json", str(a["checkpoint"] / "unimm.json")], "holds a checkpoint"),
    ]


def test_no_command_writes_over_another_commands_output_or_its_own_input(artefacts, unimm_records):
    before = {name: _fingerprint(folder) for name, folder in artefacts.items() if name != "checkpoint"}
    records_before = _fingerprint(unimm_records.parent)
    for args, message in _cases(artefacts, unimm_records):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    after = {name: _fingerprint(folder) for name, folder in artefacts.items() if name != "checkpoint"}
    assert after == before and _fingerprint(unimm_records.parent) == records_before  # nothing touched


def test_a_commands_own_output_is_still_its_own(artefacts, tmp_path):
    """The check does not get in the way: an index folder takes --overwrite, a run --resume."""
    result = runner.invoke(
        app,
        [
            "embed",
            "--model",
            str(artefacts["checkpoint"]),
            "--data",
            str(artefacts["shards"]),
            "--out",
            str(artefacts["index"]),
            "--overwrite",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
