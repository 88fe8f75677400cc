"""Checkpoints: safetensors and JSON only, written atomically (../shared/DESIGN.md §4).

A checkpoint directory::

    config.json, model.safetensors …   the image-text-to-text model (transformers from_pretrained)
    processor files                      tokenizer and image processor
    adapter/                             LoRA adapters (peft format), when not merged
    retrieval_head.safetensors           the trained retrieval head
    unimm.json                           recipe, data manifest hash, step, head sizes, pooling
    train_state/                         (training only) optimizer, scheduler, RNG, data position

It is written under a temporary name and renamed when complete. Nothing here unpickles:
optimizer state is stored as safetensors plus JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from unimm import __version__
from unimm.errors import UnimmError
from unimm.model.core import RetrievalHead, UnimmModel, load_mllm
from unimm.utils import atomic_write_json

META_NAME = "unimm.json"
ADAPTER_DIR = "adapter"
HEAD_NAME = "retrieval_head.safetensors"
STATE_DIR = "train_state"
# Keys a current checkpoint's unimm.json has; older ones get these defaults when loaded.
META_DEFAULTS: dict[str, Any] = {"pooling": "paper", "embed_dim": 256, "lora": False, "step": 0, "recipe": {}}


def save_checkpoint(
    folder: str | Path,
    model: UnimmModel,
    processor,
    meta: dict[str, Any],
    *,
    merge_lora: bool = False,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically into ``folder`` (replacing an older one there).

    Args:
        folder: destination directory.
        model: the model; a peft-wrapped model is saved as base model + adapters, or merged.
        processor: saved next to the model.
        meta: stored in ``unimm.json`` (recipe, step, data manifest hash, ...).
        merge_lora: fold LoRA adapters into the weights (a copy; the live model is untouched).
        train_state: optimizer/scheduler/RNG/data position (see :func:`pack_train_state`).
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        mllm = model.mllm
        is_peft = hasattr(mllm, "peft_config")
        if is_peft and merge_lora:
            import copy

            merged = copy.deepcopy(mllm).merge_and_unload()
            merged.save_pretrained(tmp)
        elif is_peft:
            # The base weights as the original model names them (peft renames a wrapped layer's
            # weight to ...base_layer.weight); the adapters go to adapter/, where transformers
            # does not pick them up on its own when the base is loaded.
            base = mllm.get_base_model()
            state = {
                k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k
            }
            base.save_pretrained(tmp, state_dict=state)
            mllm.save_pretrained(tmp / ADAPTER_DIR)
        else:
            mllm.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, tmp / HEAD_NAME
        )
        full_meta = {
            **meta,
            "unimm_version": __version__,
            "pooling": model.pooling,
            "embed_dim": model.head.embed_dim,
            "hidden_size": model.head.hidden_size,
            "lora": bool(is_peft and not merge_lora),
        }
        atomic_write_json(tmp / META_NAME, full_meta)
        if train_state is not None:
            _save_train_state(tmp / STATE_DIR, train_state)
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_meta(folder: str | Path) -> dict[str, Any]:
    """``unimm.json`` of a checkpoint, with defaults for keys older checkpoints lack."""
    path = Path(folder) / META_NAME
    if not path.is_file():
        raise UnimmError(
            f"{folder}: no {META_NAME}; not a unimm checkpoint (expected a folder written by `unimm train`)"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UnimmError(f"{path}: not valid JSON ({exc})") from None
    return {**META_DEFAULTS, **meta}


def load_checkpoint(
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    is_trainable: bool = False,
) -> tuple[UnimmModel, Any, dict[str, Any]]:
    """Load a checkpoint: ``(model, processor, meta)``; LoRA adapters are attached when present.

    Raises:
        UnimmError: listing what is missing (model files, head, unimm.json) and what to do.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UnimmError(f"checkpoint {folder}: not a directory")
    missing = [name for name in ("config.json", HEAD_NAME, META_NAME) if not (folder / name).is_file()]
    if missing:
        raise UnimmError(
            f"checkpoint {folder} is incomplete: missing {', '.join(missing)}; point --model at a step "
            "folder written by `unimm train` (e.g. RUN/step-000100)"
        )
    meta = read_meta(folder)
    mllm, processor = load_mllm(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    if meta.get("lora"):
        from peft import PeftModel

        if not (folder / ADAPTER_DIR / "adapter_config.json").is_file():
            raise UnimmError(f"checkpoint {folder}: unimm.json says LoRA, but {ADAPTER_DIR}/ has no adapter")
        mllm = PeftModel.from_pretrained(mllm, folder / ADAPTER_DIR, is_trainable=is_trainable)
    head_state = load_file(folder / HEAD_NAME)
    hidden = int(head_state["net.0.weight"].shape[1])
    embed_dim = int(head_state["net.2.weight"].shape[0])
    head = RetrievalHead(hidden, embed_dim)
    head.load_state_dict(head_state)
    return UnimmModel(mllm, head, pooling=meta["pooling"]), processor, meta


# ---------------------------------------------------------------------------------------------
# Training state without pickle


def pack_train_state(optimizer, scheduler, extra: dict[str, Any]) -> dict[str, Any]:
    """Everything a resumed run needs, as tensors and JSON-able values."""
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    python_state = random.getstate()
    return {
        "tensors": tensors,
        "json": {
            "optimizer_param_groups": opt["param_groups"],
            "optimizer_scalars": scalars,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng_python": [python_state[0], list(python_state[1]), python_state[2]],
            **extra,
        },
    }


def _save_train_state(folder: Path, state: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state["tensors"], folder / "state.safetensors")
    atomic_write_json(folder / "state.json", state["json"])


def load_train_state(folder: str | Path) -> dict[str, Any]:
    """Read what :func:`pack_train_state` stored in a checkpoint's ``train_state/``."""
    path = Path(folder) / STATE_DIR
    if not (path / "state.json").is_file():
        raise UnimmError(
            f"{folder}: no training state; it cannot be resumed (was it saved with --merge-lora?)"
        )
    return {
        "tensors": load_file(path / "state.safetensors"),
        "json": json.loads((path / "state.json").read_text(encoding="utf-8")),
    }


def restore_train_state(state: dict[str, Any], optimizer, scheduler) -> dict[str, Any]:
    """Load optimizer, scheduler and RNG state back; return the JSON part (data position, ...)."""
    tensors, meta = state["tensors"], state["json"]
    opt_state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = name.split(".", 2)
            opt_state.setdefault(int(pid), {})[key] = value
    for name, value in meta["optimizer_scalars"].items():
        pid, key = name.split(".", 1)
        opt_state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["optimizer_param_groups"]})
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    version, inner, gauss = meta["rng_python"]
    random.setstate((version, tuple(inner), gauss))
    return meta
