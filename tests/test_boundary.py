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
    import json

    checkpoint = shutil.copytree(trained[0], tmp_path / "ckpt")
    meta = json.loads((checkpoint / "unimm.json").read_text())
    del meta["files"]  # as a checkpoint saved before content hashes: the reader itself must say it
    (checkpoint / "unimm.json").write_text(json.dumps(meta))
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


def _flip_a_weight_byte(checkpoint) -> None:
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data: the library would load it happily
    weights.write_bytes(bytes(data))


def test_a_byte_flipped_weight_file_is_refused(trained, tiny_shards, tmp_path):
    checkpoint = shutil.copytree(trained[0], tmp_path / "ckpt")
    _flip_a_weight_byte(checkpoint)
    result = _embed(checkpoint, tiny_shards, tmp_path / "index")
    assert result.exit_code == 2
    assert "model.safetensors differs from the file saved with it" in result.output


def test_an_index_refuses_a_model_with_other_weights(trained, tmp_path):
    """Same head, same config, other weights (a consistent checkpoint of its own): the index
    records the exact model, weights included, and retrieval refuses the other one."""
    import json

    from unimm.utils import sha256_file

    checkpoint, index = trained
    other = shutil.copytree(checkpoint, tmp_path / "other")
    _flip_a_weight_byte(other)
    meta = json.loads((other / "unimm.json").read_text())
    meta["files"]["model.safetensors"] = sha256_file(other / "model.safetensors")
    (other / "unimm.json").write_text(json.dumps(meta))
    args = ["retrieve", "--model", str(other), "--index", str(index), "--query", "red"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "was embedded with another model" in result.output
    assert (
        runner.invoke(
            app, ["retrieve", "--model", str(checkpoint), "--index", str(index), "--query", "red"]
        ).exit_code
        == 0
    )


def test_a_truncated_shard_stops_embed_unless_told_and_the_loss_is_then_counted(
    trained, tiny_shards, tmp_path
):
    import json

    shards = shutil.copytree(tiny_shards, tmp_path / "shards")
    shard = sorted(shards.glob("shard-*.tar"))[1]
    shard.write_bytes(shard.read_bytes()[:5000])
    result = _embed(trained[0], shards, tmp_path / "index")
    assert result.exit_code == 2 and f"{shard}: 5000 bytes, but the manifest says" in result.output
    args = ["embed", "--model", str(trained[0]), "--data", str(shards), "--out", str(tmp_path / "lossy")]
    result = runner.invoke(app, [*args, "-q", "--set", "embed.verify=off"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "lossy" / "manifest.json").read_text())
    assert manifest["expected"] == 24 and manifest["count"] < 24
    assert f"{24 - manifest['count']} of the 24 documents" in result.output
