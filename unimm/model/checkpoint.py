"""Checkpoints: safetensors and JSON only, written atomically (docs/formats.md).

A checkpoint directory::

    config.json, model.safetensors …   the image-text-to-text model (transformers from_pretrained)
    processor files                      tokenizer, image processor and chat template (the base
                                         model's, or unimm's plain layout when it has none)
    README.md                            the model card (unimm.model.card)
    adapter/                             LoRA adapters (peft format), when not merged
    retrieval_head.safetensors           the trained retrieval head
    unimm.json                           recipe, data manifest hash, step, head sizes, pooling, and
                                         the inference settings (system prompt, max length, dtype)
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
from safetensors.torch import save_file

from unimm import __version__
from unimm.errors import UnimmError
from unimm.model.card import CHECKPOINT_USAGE, model_card
from unimm.model.core import RetrievalHead, UnimmModel, load_mllm
from unimm.utils import atomic_write_json, read_safetensors, replace_folder, sha256_file

META_NAME = "unimm.json"
ADAPTER_DIR = "adapter"
HEAD_NAME = "retrieval_head.safetensors"
CARD_NAME = "README.md"
STATE_DIR = "train_state"
# Keys a current checkpoint's unimm.json has; older ones get these defaults when loaded.
META_DEFAULTS: dict[str, Any] = {"pooling": "paper", "embed_dim": 256, "lora": False, "step": 0, "recipe": {}}
# What inference needs to rebuild a checkpoint's inputs and load it as saved (unimm.json →
# "inference"); inference reads these, never the training recipe.
INFERENCE_DEFAULTS: dict[str, Any] = {
    "system_prompt": "",
    "max_length": 2048,
    "dtype": "float32",
    "attn_implementation": "sdpa",
    "instructions": {},
    "default_instruction": "",
}


def _save_weights(tmp: Path, mllm, mllm_state: dict, *, merge_lora: bool, sharded: bool) -> bool:
    """Save the MLLM's weights into ``tmp``; return whether adapters were saved beside them."""
    is_peft = hasattr(mllm, "peft_config")
    if is_peft and merge_lora:
        if sharded:
            raise UnimmError("merge_lora needs the live, unsharded model; merge a saved checkpoint")
        import copy

        copy.deepcopy(mllm).merge_and_unload().save_pretrained(tmp)
    elif is_peft:
        # The base weights as the original model names them (peft renames a wrapped layer's
        # weight to ...base_layer.weight); the adapters go to adapter/, where transformers
        # does not pick them up on its own when the base is loaded.
        base_state = {
            k.replace(".base_layer.", "."): v
            for k, v in _strip_prefix(mllm_state, "base_model.model.").items()
            if "lora_" not in k
        }
        mllm.get_base_model().save_pretrained(tmp, state_dict=base_state)
        mllm.save_pretrained(tmp / ADAPTER_DIR, state_dict=mllm_state)
    else:
        mllm.save_pretrained(tmp, state_dict=mllm_state)
    return is_peft and not merge_lora


def _save_processor(folder: Path, processor, system_prompt: str) -> None:
    """The processor's files, with a chat template: the processor's own, or (when it has none)
    unimm's plain layout as one, so that other tools prompt the model as it was trained."""
    from unimm.data.layout import plain_chat_template

    placeholder = getattr(processor, "image_token", None)
    if getattr(processor, "chat_template", None) or not placeholder or not hasattr(processor, "tokenizer"):
        processor.save_pretrained(folder)
        return
    processor.chat_template = plain_chat_template(processor.tokenizer, placeholder, system_prompt)
    try:
        processor.save_pretrained(folder)
    finally:  # the live processor keeps choosing the plain layout the same way either way
        processor.chat_template = None


def save_checkpoint(
    folder: str | Path,
    model: UnimmModel,
    processor,
    meta: dict[str, Any],
    *,
    merge_lora: bool = False,
    train_state: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    usage: str = CHECKPOINT_USAGE,
) -> Path:
    """Write a checkpoint atomically into ``folder`` (replacing an older one there).

    Args:
        folder: destination directory.
        model: the model; a peft-wrapped model is saved as base model + adapters, or merged.
        processor: saved next to the model.
        meta: stored in ``unimm.json`` (recipe, step, data manifest hash, ...).
        merge_lora: fold LoRA adapters into the weights (a copy; the live model is untouched).
        train_state: optimizer/scheduler/RNG/data position (see :func:`pack_train_state`).
        state_dict: the model's full state dict when its live parameters are sharded (FSDP; see
            :func:`gather_training_state`); by default the live model's own.
        usage: the model card's "Use" section (an export says how other tools load it).
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        state = state_dict if state_dict is not None else model.state_dict()
        mllm_state = _strip_prefix(state, "mllm.")
        lora = _save_weights(
            tmp, model.mllm, mllm_state, merge_lora=merge_lora, sharded=state_dict is not None
        )
        _save_processor(tmp, processor, meta.get("inference", {}).get("system_prompt", ""))
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in _strip_prefix(state, "head.").items()},
            tmp / HEAD_NAME,
        )
        full_meta = {
            **meta,
            "unimm_version": __version__,
            "pooling": model.pooling,
            "embed_dim": model.head.embed_dim,
            "hidden_size": model.head.hidden_size,
            "lora": lora,
            "inference": {
                **INFERENCE_DEFAULTS,
                **meta.get("inference", {}),
                "dtype": _weights_dtype(mllm_state),
                "pooling": model.pooling,
                "embed_dim": model.head.embed_dim,
                "dimensions": sorted(
                    {model.head.embed_dim, *meta.get("inference", {}).get("dimensions", [])}, reverse=True
                ),
            },
        }
        card = model_card(
            full_meta,
            title="A unimm checkpoint",
            arch=type(model.mllm).__name__,
            usage=usage,
            library="transformers",
        )
        (tmp / CARD_NAME).write_text(card, encoding="utf-8")
        full_meta["files"] = _content_hashes(tmp)
        atomic_write_json(tmp / META_NAME, full_meta)
        if train_state is not None:
            _save_train_state(tmp / STATE_DIR, train_state)
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def copy_checkpoint(source: Path, target: Path) -> None:
    """The checkpoint's files (not its training state) in ``target``: hard links where possible."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if relative.parts[0] == STATE_DIR or not path.is_file():
            continue
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(path, destination)


def _content_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file a checkpoint loads (weights, adapters, head, config, processor), by
    path inside ``folder``; the training state and unimm.json itself are left out."""
    return {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != META_NAME and STATE_DIR not in path.relative_to(folder).parts
    }


def check_content(folder: Path, meta: dict[str, Any]) -> None:
    """Compare a checkpoint's files with the hashes recorded when it was saved (checkpoints from
    before they were recorded are not checked).

    Raises:
        UnimmError: naming a missing or changed file.
    """
    for name, digest in meta.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise UnimmError(f"checkpoint {folder}: {name} is missing (it was saved with the checkpoint)")
        if sha256_file(path) != digest:
            raise UnimmError(
                f"checkpoint {folder}: {name} differs from the file saved with it (edited or damaged); "
                "restore it from a copy, or use another checkpoint"
            )


def recover_checkpoints(run_dir: Path) -> None:
    """Tidy what an interrupted :func:`save_checkpoint` left in ``run_dir``: an unfinished new
    checkpoint (``.step-N.tmp-PID``) is removed; a replaced one (``.step-N.old-PID``) is removed
    when ``step-N`` exists, and put back as ``step-N`` when the crash came between the renames."""
    for tmp in run_dir.glob(".step-*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in run_dir.glob(".step-*.old-*"):
        final = run_dir / old.name[1:].rsplit(".old-", 1)[0]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(final)


def _weights_dtype(state: dict[str, torch.Tensor]) -> str:
    """The dtype most of the floating-point weights are stored in (``float32``, ``bfloat16``...)."""
    counts: dict[torch.dtype, int] = {}
    for value in state.values():
        if value.is_floating_point():
            counts[value.dtype] = counts.get(value.dtype, 0) + value.numel()
    dtype = max(counts, key=counts.get) if counts else torch.float32
    return str(dtype).removeprefix("torch.")


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


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
    meta = {**META_DEFAULTS, **meta}
    if "inference" not in meta:  # written before the inference settings were (unimm < 0.2)
        meta["inference"] = _inference_of_old(Path(folder), meta)
    meta["inference"].setdefault("dimensions", [meta["inference"]["embed_dim"]])  # before Matryoshka
    meta["inference"].setdefault("instructions", {})  # before task instructions
    meta["inference"].setdefault("default_instruction", "")
    return meta


def _inference_of_old(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Inference settings of a checkpoint that predates them: from the recipe it recorded, the
    weights' dtype from config.json, today's defaults for the rest."""
    model = meta.get("recipe", {}).get("model", {})
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    dtype = config.get("dtype") or config.get("torch_dtype") or INFERENCE_DEFAULTS["dtype"]
    return {
        "system_prompt": model.get("system_prompt", INFERENCE_DEFAULTS["system_prompt"]),
        "max_length": model.get("max_length", INFERENCE_DEFAULTS["max_length"]),
        "dtype": dtype if dtype in ("float32", "bfloat16", "float16") else INFERENCE_DEFAULTS["dtype"],
        "pooling": meta["pooling"],
        "embed_dim": meta["embed_dim"],
        "attn_implementation": INFERENCE_DEFAULTS["attn_implementation"],
    }


def load_checkpoint(
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    is_trainable: bool = False,
    attn_implementation: str | None = None,
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
    check_content(folder, meta)
    mllm, processor = load_mllm(
        folder, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation
    )
    if meta.get("lora"):
        from peft import PeftModel

        if not (folder / ADAPTER_DIR / "adapter_config.json").is_file():
            raise UnimmError(f"checkpoint {folder}: unimm.json says LoRA, but {ADAPTER_DIR}/ has no adapter")
        try:
            mllm = PeftModel.from_pretrained(mllm, folder / ADAPTER_DIR, is_trainable=is_trainable)
        except Exception as exc:  # peft/safetensors raise many types for damaged adapter files
            raise UnimmError(
                f"checkpoint {folder}: cannot load its LoRA adapter in {ADAPTER_DIR}/ ({type(exc).__name__}: "
                f"{exc}); the adapter files are damaged or from another model"
            ) from None
    head_state = read_safetensors(folder / HEAD_NAME, "retrieval head")
    try:
        hidden = int(head_state["net.0.weight"].shape[1])
        embed_dim = int(head_state["net.2.weight"].shape[0])
        head = RetrievalHead(hidden, embed_dim)
        head.load_state_dict(head_state)
    except (KeyError, RuntimeError, IndexError) as exc:
        raise UnimmError(
            f"{folder / HEAD_NAME}: not a unimm retrieval head ({type(exc).__name__}: {exc})"
        ) from None
    return UnimmModel(mllm, head, pooling=meta["pooling"]), processor, meta


# ---------------------------------------------------------------------------------------------
# Training state without pickle


# Version 2: optimizer state by parameter name (not by position), the format of
# ``torch.distributed.checkpoint.state_dict``, so one file serves a single process, DDP and FSDP;
# RNG states and data positions of every rank.
TRAIN_STATE_FORMAT = 2


def gather_training_state(accelerator, model, optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full model and optimizer state dicts; on the main process, empty elsewhere.

    A collective: every rank must call it (under FSDP each holds a shard that is gathered here).

    Args:
        accelerator: the run's ``accelerate.Accelerator``.
        model: the prepared model (DDP- or FSDP-wrapped, or plain).
        optimizer: the prepared optimizer.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model_state = accelerator.get_state_dict(model)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper → the torch optimizer
    optimizer_state = get_optimizer_state_dict(
        model, inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not accelerator.is_main_process:
        return {}, {}
    return model_state, optimizer_state


def rank_state(data_position: dict[str, Any]) -> dict[str, Any]:
    """This process's RNG states and data position (gather them from every rank for a checkpoint)."""
    python_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "data_position": data_position,
    }


def pack_train_state(
    optimizer_state: dict[str, Any], scheduler, rank_states: list[dict[str, Any]], extra: dict[str, Any]
) -> dict[str, Any]:
    """Everything a resumed run needs, as tensors and JSON-able values.

    Args:
        optimizer_state: the full optimizer state by parameter name (:func:`gather_training_state`).
        scheduler: the learning-rate scheduler (or None).
        rank_states: :func:`rank_state` of every rank, in rank order.
        extra: JSON-able values stored as they are (step, history, ...).
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, state in optimizer_state["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    for rank, state in enumerate(rank_states):
        tensors[f"rng/{rank}/torch"] = state["torch"]
        if state["cuda"] is not None:
            tensors[f"rng/{rank}/cuda"] = state["cuda"]
    return {
        "tensors": tensors,
        "json": {
            "format": TRAIN_STATE_FORMAT,
            "processes": len(rank_states),
            "optimizer_param_groups": optimizer_state["param_groups"],
            "optimizer_scalars": scalars,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng_python": [state["python"] for state in rank_states],
            "data_positions": [state["data_position"] for state in rank_states],
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
        "tensors": read_safetensors(path / "state.safetensors", "training state"),
        "json": json.loads((path / "state.json").read_text(encoding="utf-8")),
    }


def restore_train_state(
    state: dict[str, Any], model, optimizer, scheduler, *, rank: int = 0, world: int = 1
) -> dict[str, Any]:
    """Load optimizer, scheduler and this rank's RNG state back; return the JSON part.

    Call it on every rank after ``accelerator.prepare`` (under FSDP each rank keeps its shard).
    The returned ``data_position`` is this rank's.

    Raises:
        UnimmError: the training state is in an older format, or was saved by another number
            of processes (each rank's data split and RNG would not match).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    tensors, meta = state["tensors"], state["json"]
    if meta.get("format") != TRAIN_STATE_FORMAT:
        raise UnimmError(
            "resume: this checkpoint's training state was written by an older unimm and cannot be "
            "resumed; start a new run from its weights with --set model.path=CHECKPOINT instead"
        )
    if meta["processes"] != world:
        raise UnimmError(
            f"resume: the run was saved by {meta['processes']} process(es) but is launched with {world}; "
            f"launch it with {meta['processes']} again (an exact resume needs each rank's data split and "
            "random state), or start a new run from its weights with --set model.path=CHECKPOINT"
        )
    by_name: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, name, field = key.split("/", 2)
            by_name.setdefault(name, {})[field] = value
    for name, fields in meta["optimizer_scalars"].items():
        by_name.setdefault(name, {}).update(fields)
    set_optimizer_state_dict(
        model,
        getattr(optimizer, "optimizer", optimizer),
        optim_state_dict={"state": by_name, "param_groups": meta["optimizer_param_groups"]},
        options=StateDictOptions(full_state_dict=True),
    )
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors[f"rng/{rank}/torch"])
    if f"rng/{rank}/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"rng/{rank}/cuda"])
    version, inner, gauss = meta["rng_python"][rank]
    random.setstate((version, tuple(inner), gauss))
    return {**meta, "data_position": meta["data_positions"][rank]}
