"""The error boundary: failures a user can cause end in one message and exit 2 — damaged weights,
an unwritable output, a missing file — never a library traceback; UNIMM_DEBUG=1 shows it."""

from __future__ import annotations

import shutil

from typer.testing import CliRunner

from unimm.cli import app

runner = CliRunner()


def _embed(checkpoint, shards, out, **env):
    args = ["embed", "--model", str(checkpoint), "--data", str(shards), "--out", str(out), "-q"]
    return runner.invoke(app, args, env=env)


def test_a_damaged_retrieval_head_is_named(trained, tiny_shards, tmp_path):
    checkpoint = shutil.copytree(trained[0], tmp_path / "ckpt")
    head = checkpoint / "retrieval_head.safetensors"
    data = bytearray(head.read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")  # a header length past the end: truncated/edited
    head.write_bytes(bytes(data))
    result = _embed(checkpoint, tiny_shards, tmp_path / "index")
    assert result.exit_code == 2
    assert f"{head}: not a readable safetensors file" in result.output and "Traceback" not in result.output


def test_an_output_under_a_file_is_an_os_message_not_a_traceback(trained, tiny_shards, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = _embed(trained[0], tiny_shards, blocker / "index")
    assert result.exit_code == 2, result.output
    assert "Not a directory" in result.output and "check the path" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_unimm_debug_shows_the_traceback(trained, tiny_shards, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = _embed(trained[0], tiny_shards, blocker / "index", UNIMM_DEBUG="1")
    assert result.exit_code != 0 and isinstance(result.exception, OSError)
