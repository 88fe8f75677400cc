"""Experiment trackers (``train.report_to``): TensorBoard, Weights & Biases and MLflow through
accelerate's trackers.

Each logged step's line of ``metrics.jsonl`` goes to every tracker too, as numbers under the same
names (``loss``, ``loss_gen``, ``loss_disc``, ``loss_pair``, ``lr``, ``grad_norm``, ``tokens_per_s``,
``samples_per_s``, the evaluation figures ``eval_loss_gen`` and ``coco/text_to_image/R@1``…), at
the optimizer step. The resolved configuration is the run's hyperparameters (flattened to
``section.key``). Where they write, unless the user's environment says otherwise:

- tensorboard: ``RUN/trackers/NAME/`` (event files; ``tensorboard --logdir RUN/trackers``);
- wandb: ``RUN/wandb/`` (``WANDB_MODE=offline`` keeps it there; ``wandb sync`` uploads it later);
- mlflow: ``MLFLOW_TRACKING_URI``, else a file store in ``RUN/mlruns`` (``mlflow ui
  --backend-store-uri RUN/mlruns``).

``NAME`` is ``train.run_name`` or the run folder's name. Only the main process writes. A line
reaches the trackers when ``metrics.jsonl`` gets it (every ``train.log_every`` steps, so an
evaluation shows when its step is one of those). A resumed run goes on at its step: TensorBoard
appends to the same folder; wandb and MLflow open a new run under the same name. MLflow's names
take no ``@``: ``R@1`` is ``R_at_1`` there.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from unimm.errors import UnimmError

log_ = logging.getLogger(__name__)
_MLFLOW_UNSAFE = re.compile(r"[^\w\-. :/]")
_FAILED: set[str] = set()  # trackers already warned about (once per process)
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
LOGGING_DIR = "trackers"


def chosen(report_to: list[str]) -> list[str]:
    """The trackers named (``none`` names none)."""
    return [name for name in report_to if name != "none"]


def check_installed(report_to: list[str]) -> None:
    """Refuse, before any work, a tracker whose package is missing.

    Raises:
        UnimmError: naming the package and the extra that installs it.
    """
    for name in chosen(report_to):
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise UnimmError(
                f'train.report_to={name} needs the {_PACKAGES[name]} package: pip install "unimm[{name}]"'
            )


def accelerator_options(report_to: list[str], run_dir: Path) -> dict[str, Any]:
    """``Accelerator(...)`` keyword arguments for the trackers (none when there are none)."""
    names = chosen(report_to)
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / LOGGING_DIR))
    return {"log_with": names, "project_config": project}


def _hyperparameters(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The configuration flattened to ``section.key`` scalars (lists and mappings as JSON), as
    every tracker's hyperparameter table takes them."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            out |= _hyperparameters(value, f"{name}.")
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def start(accelerator, report_to: list[str], run_dir: Path, run_name: str, config: dict[str, Any]) -> bool:
    """Open the trackers' run; whether there are any.

    Raises:
        UnimmError: a tracker that cannot start (its message says why).
    """
    names = chosen(report_to)
    if not names:
        return False
    name = run_name or run_dir.name
    init: dict[str, Any] = {}
    if "wandb" in names:
        init["wandb"] = {"dir": str(run_dir), "name": name}
    if "mlflow" in names:
        init["mlflow"] = {"run_name": name}
        if not os.environ.get("MLFLOW_TRACKING_URI") and accelerator.is_main_process:
            import mlflow

            # MLflow 3 keeps its file store only on request; it needs no database server or
            # SQLAlchemy, which is what a run folder of one's own wants.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
    try:
        accelerator.init_trackers(name, config=_hyperparameters(config), init_kwargs=init)
    except Exception as exc:  # each tracker raises its own types (network, store, credentials)
        raise UnimmError(
            f"train.report_to={','.join(names)}: a tracker did not start ({type(exc).__name__}: {exc})"
        ) from None
    return True


def figures(line: dict[str, Any], batch: int) -> dict[str, float]:
    """What the trackers get of a ``metrics.jsonl`` line: its finite numbers, and samples/s
    (``batch``: samples per optimizer step, all processes)."""
    out = {
        key: float(value)
        for key, value in line.items()
        if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)
    }
    if line.get("seconds"):
        out["samples_per_s"] = batch / line["seconds"]
    return out


def tracker_names(values: dict[str, float], tracker: str) -> dict[str, float]:
    """``values`` under names ``tracker`` accepts: MLflow takes only letters, digits and
    ``_-. :/``, so ``coco/text_to_image/R@1`` is logged there as ``coco/text_to_image/R_at_1``."""
    if tracker != "mlflow":
        return values
    return {
        _MLFLOW_UNSAFE.sub(lambda m: "_at_" if m.group() == "@" else "_", k): v for k, v in values.items()
    }


def log(accelerator, line: dict[str, Any], batch: int) -> None:
    """One step's figures to every tracker. A tracker that fails (a full disk, a lost server)
    is warned about once and training goes on: ``metrics.jsonl`` has every step."""
    if not accelerator.is_main_process:
        return
    values, step = figures(line, batch), int(line["step"])
    for tracker in accelerator.trackers:
        try:
            tracker.log(tracker_names(values, tracker.name), step=step)
        except Exception as exc:  # each tracker raises its own types
            if tracker.name not in _FAILED:
                _FAILED.add(tracker.name)
                log_.warning(
                    "train.report_to=%s: logging step %d failed (%s: %s); training goes on, "
                    "metrics.jsonl has every step",
                    tracker.name,
                    step,
                    type(exc).__name__,
                    exc,
                )


def end(accelerator) -> None:
    """Close the trackers' run (flushes TensorBoard's event file, ends the wandb and mlflow runs)."""
    accelerator.end_training()
