"""``unimm train``: joint generative + structure-induced training (``L = L_g + α·L_d``).

    unimm train --recipe tiny-cpu --set data.train=shards --set train.max_steps=50 \
        --out runs/tiny
    accelerate launch --config_file "$(unimm recipes accelerate/ddp)" -m unimm.cli train \
        --recipe ... --out RUN

One lifecycle: setup (data, model, optimizer) → train (steps) → save → cleanup. The per-step
function :func:`train_step` returns ``loss``, ``loss_gen`` and ``loss_disc``.

The step itself (losses, gradient caching, evaluation) is in :mod:`unimm.training.step`, the sections
of the configuration in :mod:`unimm.config`; this module holds the model set-up and the loop.

Resume: a checkpoint holds the model, the optimizer, the scheduler, the RNG states and the data
position, all as safetensors/JSON; ``--resume`` continues from the newest one and reproduces the
uninterrupted run's losses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from unimm.config import ModelOptions, TrainConfig, config_to_dict
from unimm.data.stream import BatchMaker, check_shards, open_batches, training_texts
from unimm.errors import UnimmError
from unimm.training.distributed import gather_objects
from unimm.training.step import evaluate, load_eval_batches, train_step, train_step_cached

# Testing hook: exit hard right after step N (its metrics written, no checkpoint), as a kill would.
_FAULT_ENV = "UNIMM_FAULT_AFTER_STEPS"

# ---------------------------------------------------------------------------------------------
# Model


def build_model(cfg: TrainConfig, run_dir: Path, resume_from: Path | None):
    """The trainable model and its processor (from a resumed checkpoint, a path, or the tiny factory)."""
    from unimm.model.core import RetrievalHead, UnimmModel, load_mllm

    opts = cfg.model
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[opts.dtype]
    if resume_from is not None:
        from unimm.model.checkpoint import load_checkpoint

        model, processor, _ = load_checkpoint(
            resume_from, dtype=dtype, trust_remote_code=opts.trust_remote_code, is_trainable=True
        )
        _set_trainable(model, opts, lora_done=True)
        return model, processor
    if opts.tiny:
        from unimm.model.tiny import save_tiny_llava

        base = run_dir / "tiny-base"
        if not (base / "config.json").is_file():
            save_tiny_llava(base, training_texts(cfg.data), seed=cfg.train.seed)
        mllm, processor = load_mllm(base, dtype=dtype)
    else:
        mllm, processor = load_mllm(opts.path, dtype=dtype, trust_remote_code=opts.trust_remote_code)
    torch.manual_seed(cfg.train.seed)
    hidden = mllm.config.text_config.hidden_size
    head = RetrievalHead(hidden, opts.embed_dim)
    if opts.lora:
        from peft import LoraConfig, get_peft_model

        pattern = r".*language_model.*\.(" + "|".join(opts.lora_targets) + r")$"
        mllm = get_peft_model(
            mllm,
            LoraConfig(
                r=opts.lora_r,
                lora_alpha=opts.lora_alpha,
                lora_dropout=opts.lora_dropout,
                target_modules=pattern,
            ),
        )
    model = UnimmModel(mllm, head, pooling=opts.pooling)
    _set_trainable(model, opts, lora_done=opts.lora)
    return model, processor


def _set_trainable(model, opts: ModelOptions, *, lora_done: bool) -> None:
    base = model.base
    for name, param in model.mllm.named_parameters():
        keep = lora_done and "lora_" in name
        param.requires_grad_(keep)
    if opts.train_projector:
        base.model.multi_modal_projector.requires_grad_(True)
    if opts.train_vision:
        base.model.vision_tower.requires_grad_(True)
    if opts.train_lm and not opts.lora:
        base.model.language_model.requires_grad_(True)
        base.lm_head.requires_grad_(True)
    model.head.requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# The run


def _latest_checkpoint(run_dir: Path) -> Path | None:
    steps = sorted(p for p in run_dir.glob("step-*") if (p / "train_state" / "state.json").is_file())
    return steps[-1] if steps else None


def train(cfg: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train as configured; return the final metrics. See the module docstring."""
    from accelerate import Accelerator
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from unimm.data.collate import Collator
    from unimm.model.checkpoint import (
        gather_training_state,
        load_checkpoint,
        load_train_state,
        pack_train_state,
        rank_state,
        restore_train_state,
        save_checkpoint,
    )

    opts = cfg.train
    run_dir = Path(cfg.out)
    manifests = check_shards(cfg.data, need_teachers=opts.alpha > 0)
    if cfg.data.eval:
        check_shards(dataclasses.replace(cfg.data, train=cfg.data.eval), need_teachers=opts.alpha > 0)
    resume_from = _latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and resume_from is None and (run_dir / "metrics.jsonl").exists():
        raise UnimmError(f"--resume: {run_dir} has no checkpoint with a training state to resume from")
    if not cfg.resume and any(run_dir.glob("step-*")):
        raise UnimmError(
            f"--out {run_dir} already holds a run; pass --resume to continue it, or choose another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    random.seed(opts.seed)
    torch.manual_seed(opts.seed)
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    # accelerate keeps one state per process; a second run in the same process (a notebook, the
    # tests) may ask for another precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)

    # Unused parameters are normal here (the head when α = 0, the LM head when gen_weight = 0).
    accelerator = Accelerator(
        mixed_precision=opts.mixed_precision,
        gradient_accumulation_steps=opts.grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        # Without it, accelerate treats several CPU processes (torchrun) as one and skips DDP.
        cpu=not torch.cuda.is_available(),
    )
    check_parallelism(accelerator)
    with accelerator.main_process_first():  # the tiny base model is built once, by rank 0
        model, processor = build_model(cfg, run_dir, resume_from)
    if opts.gradient_checkpointing:  # transformers 5 renamed it; older versions have the old name
        enable = getattr(model.base, "activation_checkpointing_enable", None)
        (enable or model.base.gradient_checkpointing_enable)()
    collator = Collator.for_model(
        model,
        processor,
        max_length=cfg.model.max_length,
        system_prompt=cfg.model.system_prompt,
        cut_points=cfg.data.cut_points,
        seed=opts.seed,
    )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=opts.lr, weight_decay=opts.weight_decay
    )
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(opts.warmup_ratio * opts.max_steps), opts.max_steps
    )
    # Under FSDP a forward pass gathers parameters from every rank, so every rank evaluates.
    sharded = accelerator.is_fsdp2
    eval_batches = load_eval_batches(cfg, collator) if accelerator.is_main_process or sharded else []
    step, history = 0, {"nonfinite": 0, "nonfinite_total": 0, "dropped_slices": 0, "corrupt_samples": 0}
    data_position = None
    # The scheduler stays outside prepare(): accelerate would step it once per process per call,
    # while train.max_steps counts optimizer steps of the whole run.
    model, optimizer = accelerator.prepare(model, optimizer)
    # After prepare: FSDP replaces the parameters by sharded ones (the optimizer follows).
    params = [p for p in model.parameters() if p.requires_grad]
    if resume_from is not None:
        meta = restore_train_state(
            load_train_state(resume_from),
            model,
            optimizer,
            scheduler,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
        )
        step = int(meta["step"])
        history.update(meta.get("history", {}))
        data_position = meta["data_position"]
        if accelerator.is_main_process:
            _truncate_metrics(run_dir / "metrics.jsonl", step)
    data_hash = [m["fingerprint"] for m in manifests]
    parallelism = {"kind": accelerator.distributed_type.value, "processes": accelerator.num_processes}
    recipe = config_to_dict(cfg)
    # What inference rebuilds the inputs with (the checkpoint adds its dtype, pooling and size).
    inference = {"system_prompt": cfg.model.system_prompt, "max_length": cfg.model.max_length}
    bar = tqdm(
        total=opts.max_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not (progress and accelerator.is_main_process),
    )
    metrics_file = (
        (run_dir / "metrics.jsonl").open("a", encoding="utf-8") if accelerator.is_main_process else None
    )
    last: dict[str, Any] = {}
    fault_after = int(os.environ[_FAULT_ENV]) if os.environ.get(_FAULT_ENV) else None

    batches = None
    try:
        batches = open_batches(
            cfg.data,
            opts.seed + accelerator.process_index,
            opts.batch_size,
            BatchMaker(collator, opts.grad_cache_chunk),
            data_position,
        )
        while step < opts.max_steps:
            start = time.perf_counter()
            parts, gen, disc, views, tokens = [], 0.0, 0.0, 0, 0
            skipped = False
            for _ in range(opts.grad_accum):
                payload, corrupt = batches.next()
                history["corrupt_samples"] += corrupt
                if opts.grad_cache_chunk:
                    chunks = payload
                    history["dropped_slices"] += sum(c["dropped_slices"] for c in chunks)
                    result = train_step_cached(
                        model,
                        chunks,
                        cfg,
                        lambda loss: accelerator.backward(loss / opts.grad_accum),
                        lambda: accelerator.no_sync(model),
                    )
                    skipped = skipped or not math.isfinite(result.objective)
                    parts.append(result.objective)
                    gen += result.loss_gen / opts.grad_accum
                    disc += result.loss_disc / opts.grad_accum
                    views += result.views
                    tokens += result.tokens
                    continue
                batch = payload
                history["dropped_slices"] += batch["dropped_slices"]
                with accelerator.accumulate(model):
                    result = train_step(model, batch, cfg)
                    finite = bool(torch.isfinite(result.loss))  # one device sync per micro-step
                    if finite:
                        accelerator.backward(result.loss / opts.grad_accum)
                    else:
                        skipped = True
                parts.append(result.objective if finite else float("nan"))
                gen += result.loss_gen / opts.grad_accum
                disc += result.loss_disc / opts.grad_accum
                views += result.views
                tokens += result.tokens
            grad_norm = None
            if skipped:
                optimizer.zero_grad(set_to_none=True)
                history["nonfinite"] += 1
                history["nonfinite_total"] += 1
                if history["nonfinite"] >= opts.max_nonfinite:
                    raise UnimmError(
                        f"{history['nonfinite']} steps in a row had a non-finite loss (last at step "
                        f"{step + 1}); lower train.lr, use train.mixed_precision=bf16 instead of fp16, or "
                        "check the data"
                    )
            else:
                history["nonfinite"] = 0
                if opts.max_grad_norm > 0:
                    norm = accelerator.clip_grad_norm_(params, opts.max_grad_norm)
                    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - start
            last = {
                "step": step,
                "loss": sum(parts) / len(parts),
                "loss_gen": gen,
                "loss_disc": disc,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "views": views,
                "tokens": tokens,
                "tokens_per_s": tokens / seconds if seconds else None,
                "seconds": seconds,
                "skipped": skipped,
            }
            if eval_batches and step % opts.eval_every == 0:
                last.update(evaluate(accelerator.unwrap_model(model), eval_batches, cfg))
            if metrics_file is not None and step % opts.log_every == 0:
                metrics_file.write(json.dumps(last) + "\n")
                metrics_file.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}", gen=f"{gen:.3f}", disc=f"{disc:.4f}")
            if fault_after is not None and step == fault_after:
                os._exit(75)  # testing hook: die like a killed run (see _FAULT_ENV)
            if step % opts.save_every == 0 or step == opts.max_steps:
                model_state, optimizer_state = gather_training_state(accelerator, model, optimizer)
                rank_states = gather_objects(rank_state(batches.position))
                if accelerator.is_main_process:
                    state = pack_train_state(
                        optimizer_state, scheduler, rank_states, {"step": step, "history": history}
                    )
                    save_checkpoint(
                        run_dir / f"step-{step:06d}",
                        accelerator.unwrap_model(model),
                        processor,
                        {
                            "recipe": recipe,
                            "step": step,
                            "data_manifests": data_hash,
                            "parallelism": parallelism,
                            "inference": inference,
                        },
                        train_state=state,
                        state_dict=model_state,
                    )
                    _prune(run_dir, opts.keep_last)
                accelerator.wait_for_everyone()
    finally:
        if batches is not None:
            batches.close()
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
    if accelerator.is_main_process and opts.merge_lora:
        # From the final checkpoint, not the live model: its parameters may be sharded (FSDP).
        final, final_processor, final_meta = load_checkpoint(run_dir / f"step-{step:06d}")
        save_checkpoint(
            run_dir / "final-merged",
            final,
            final_processor,
            {key: final_meta[key] for key in ("recipe", "step", "data_manifests", "inference")},
            merge_lora=True,
        )
    return {**last, "history": history, "main": accelerator.is_main_process}


def check_parallelism(accelerator) -> None:
    """Refuse launchers ``unimm train`` does not support, before any work is done.

    Supported: one process, DDP (several GPUs or CPU processes) and FSDP version 2 (checkpoints
    gather the full model and optimizer state from every rank). Not supported: FSDP version 1
    (deprecated by PyTorch; only version 2 is tested) and DeepSpeed (it owns the optimizer and
    checkpoints in its own pickle-based format).

    Raises:
        UnimmError: naming the launcher setting and the supported alternative.
    """
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if kind == "FSDP" and not accelerator.is_fsdp2:
        raise UnimmError(
            "unimm train supports FSDP version 2 only; set fsdp_version: 2 in the accelerate config "
            "(as the shipped recipe accelerate/fsdp does)"
        )
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise UnimmError(
            f"unimm train does not support {kind} (it owns the optimizer and checkpoints in its own "
            "pickle-based format); launch with FSDP to shard the model (accelerate launch --config_file "
            '"$(unimm recipes accelerate/fsdp)") or with DDP (accelerate/ddp, or torchrun) — with '
            "LoRA a 7B model fits one GPU per process, and train.grad_cache_chunk grows the global batch "
            "past memory"
        )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _prune(run_dir: Path, keep: int) -> None:
    steps = sorted(run_dir.glob("step-*"))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
