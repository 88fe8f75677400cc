"""`train.report_to`: every tracker gets what metrics.jsonl logs, read back with each tracker's
own reader — TensorBoard's event accumulator, MLflow's client on its file store, and the records
of a wandb offline run (its LevelDB-style log of protobuf records, parsed here)."""

from __future__ import annotations

import json
import struct

import pytest
from helpers import config, metrics

from unimm.commands.train import run
from unimm.errors import ConfigError, UnimmError

LOGGED = ("loss", "loss_gen", "loss_disc", "lr", "grad_norm", "tokens_per_s")


def wandb_history(run_file) -> list[dict]:
    """The history rows of a wandb offline run file: a 7-byte header, then 32 KiB blocks of
    records (4-byte checksum, 2-byte length, 1-byte type: full, first, middle, last), each a
    ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos = run_file.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    records, pending = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        body, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(body)
        elif kind in (2, 3):
            pending = (pending if kind == 3 else b"") + body
        elif kind == 4:
            records.append(pending + body)
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            )
    return rows


def test_every_tracker_gets_what_the_jsonl_logs(tmp_path, tiny_shards, monkeypatch):
    pytest.importorskip("tensorboard")
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run_dir = tmp_path / "run"
    cfg = config(
        run_dir,
        tiny_shards,
        "train.max_steps=4",
        "train.save_every=4",
        f"data.eval={tiny_shards}",
        "train.eval_every=2",
        "train.eval_batches=1",
        "train.report_to=[tensorboard, mlflow, wandb]",
        "train.run_name=probe",
    )
    run(cfg, progress=False)
    rows = metrics(run_dir)
    batch = cfg.train.batch_size

    events = EventAccumulator(str(run_dir / "trackers" / "probe"))
    events.Reload()
    for key in LOGGED:
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [1, 2, 3, 4]
        assert [v for _, v in got] == pytest.approx([r[key] for r in rows], rel=1e-6)  # float32 on disk
    assert [e.step for e in events.Scalars("eval_loss_gen")] == [2, 4]
    assert [e.value for e in events.Scalars("samples_per_s")] == pytest.approx(
        [batch / r["seconds"] for r in rows], rel=1e-6
    )

    client = mlflow.tracking.MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "probe"]
    (found,) = client.search_runs([experiment.experiment_id])
    for key in LOGGED:
        history = sorted(client.get_metric_history(found.info.run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r[key])) for r in rows]
    assert float(found.data.params["train.lr"]) == cfg.train.lr
    assert json.loads(found.data.params["train.report_to"]) == ["tensorboard", "mlflow", "wandb"]

    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    assert [h["_step"] for h in history] == [1, 2, 3, 4]
    for key in LOGGED:
        assert [h[key] for h in history] == pytest.approx([r[key] for r in rows])
    assert [h.get("eval_loss_gen") for h in history][1::2] == pytest.approx(
        [rows[1]["eval_loss_gen"], rows[3]["eval_loss_gen"]]
    )


def test_bad_tracker_settings_are_refused_before_training(tmp_path, tiny_shards, monkeypatch):
    with pytest.raises(
        ConfigError, match=r"train\.report_to: comet; give any of tensorboard, wandb, mlflow, or none"
    ):
        config(tmp_path / "a", tiny_shards, "train.report_to=[comet]")
    with pytest.raises(ConfigError, match="none with others"):
        config(tmp_path / "b", tiny_shards, "train.report_to=[none, wandb]")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(UnimmError, match=r'needs the wandb package: pip install "unimm\[wandb\]"'):
        run(config(tmp_path / "c", tiny_shards, "train.report_to=wandb"), progress=False)
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_benchmark_names_reach_mlflow_and_a_failing_tracker_only_warns(tmp_path, monkeypatch, caplog):
    """Benchmark figures are named like `coco/text_to_image/R@1`, which MLflow refuses: it gets
    `R_at_1`, TensorBoard the name itself; a tracker whose log raises is warned about once."""
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from unimm.training import trackers

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    AcceleratorState._reset_state(reset_partial_state=False)
    report_to = ["mlflow", "tensorboard"]
    accelerator = Accelerator(cpu=True, **trackers.accelerator_options(report_to, tmp_path))
    assert trackers.start(accelerator, report_to, tmp_path, "bench", {"train": {"lr": 0.1}})
    line = {"step": 3, "loss": 1.5, "coco/text_to_image/R@1": 0.25, "seconds": 2.0}
    trackers.log(accelerator, line, batch=8)
    (tensorboard,) = [t for t in accelerator.trackers if t.name == "tensorboard"]
    monkeypatch.setattr(tensorboard, "log", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    trackers._FAILED.clear()
    with caplog.at_level("WARNING", logger="unimm.training.trackers"):
        trackers.log(accelerator, {**line, "step": 4}, batch=8)
        trackers.log(accelerator, {**line, "step": 5}, batch=8)
    assert [r.getMessage() for r in caplog.records].count(
        "train.report_to=tensorboard: logging step 4 failed (OSError: disk full); training goes on, "
        "metrics.jsonl has every step"
    ) == 1 and len(caplog.records) == 1
    trackers.end(accelerator)
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("bench").experiment_id])
    history = client.get_metric_history(run.info.run_id, "coco/text_to_image/R_at_1")
    assert [(m.step, m.value) for m in history] == [(3, 0.25), (4, 0.25), (5, 0.25)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "samples_per_s")] == [4.0] * 3
    events = EventAccumulator(str(tmp_path / "trackers" / "bench"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("coco/text_to_image/R@1")] == [(3, 0.25)]
