"""``unimm train``: joint generative + structure-induced training (``L = L_g + α·L_d``).

    unimm train --recipe tiny-cpu --set data.train=shards --set train.max_steps=50 \
        --out runs/tiny
    accelerate launch --config_file "$(unimm recipes --path accelerate/ddp)" --num_processes 8 \
        -m unimm.cli train --recipe ... --out RUN

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
from unimm.data.stream import (
    BatchMaker,
    check_data_fits,
    check_instructions,
    check_shards,
    open_batches,
    training_texts,
)
from unimm.errors import UnimmError
from unimm.training import trackers
from unimm.training.distributed import broadcast_flag, gather_objects, resolve_mixed_precision
from unimm.training.optim import build_optimizer, build_schedule
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
            resume_from,
            dtype=dtype,
            trust_remote_code=opts.trust_remote_code,
            is_trainable=True,
            attn_implementation=opts.attn_implementation,
        )
        _set_trainable(model, opts, lora_done=True)
        return model, processor
    if opts.tiny:
        from unimm.tiny import save_tiny_llava

        base = run_dir / "tiny-base"
        if not (base / "config.json").is_file():
            save_tiny_llava(base, training_texts(cfg.data), seed=cfg.train.seed)
        mllm, processor = load_mllm(base, dtype=dtype, attn_implementation=opts.attn_implementation)
    else:
        mllm, processor = load_mllm(
            opts.path,
            dtype=dtype,
            trust_remote_code=opts.trust_remote_code,
            attn_implementation=opts.attn_implementation,
        )
    torch.manual_seed(cfg.train.seed)
    hidden = mllm.config.text_config.hidden_size
    head = RetrievalHead(hidden, opts.embed_dim)
    if opts.lora:
        from peft import LoraConfig, get_peft_model

        from unimm.model.parts import find_parts

        pattern = find_parts(mllm).lora_pattern(opts.lora_targets)
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
    from unimm.model.parts import find_parts

    parts = find_parts(model.mllm)
    for name, param in model.mllm.named_parameters():
        keep = lora_done and "lora_" in name
        param.requires_grad_(keep)
    if opts.train_projector:
        parts.connector.requires_grad_(True)
    if opts.train_vision:
        parts.vision.requires_grad_(True)
    if opts.train_lm and not opts.lora:
        parts.language.requires_grad_(True)
        lm_head = getattr(model.base, "lm_head", None)
        if lm_head is not None:
            lm_head.requires_grad_(True)
    model.head.requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# The run


def _latest_checkpoint(run_dir: Path) -> Path | None:
    steps = sorted(p for p in run_dir.glob("step-*") if (p / "train_state" / "state.json").is_file())
    return steps[-1] if steps else None


def train(cfg: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train as configured; return the final metrics (with ``history`` and ``main``, whether this
    process is the main one). See the module docstring and :class:`Trainer`."""
    trainer = Trainer(cfg, progress=progress)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()


class Trainer:
    """One training run, in four stages: :meth:`setup` (checks, accelerator, model, data,
    optimizer, resumed state), :meth:`train` (optimizer steps; checkpoints every
    ``train.save_every``), :meth:`save` (a checkpoint of the current step, a collective) and
    :meth:`cleanup` (close the data stream and the logs; safe after a failure)."""

    def __init__(self, cfg: TrainConfig, *, progress: bool = True) -> None:
        self.cfg, self.opts, self.progress = cfg, cfg.train, progress
        self.run_dir = Path(cfg.out)
        self.step = 0
        self.history = {"nonfinite": 0, "nonfinite_total": 0, "dropped_slices": 0, "corrupt_samples": 0}
        self.evaluation: tuple[int, dict[str, float]] = (-1, {})
        # samples trained, by the losses they trained (this process; records' task, data.task_fraction)
        self.history["samples"] = {"both": 0, "generative": 0, "discriminative": 0}
        self.batches = self.bar = self.metrics_file = self.accelerator = None
        self.tracking = False
        self.last: dict[str, Any] = {}

    # -- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        """Check the data and the output folder, build everything, restore a resumed state."""
        from unimm.data.collate import Collator

        cfg, opts = self.cfg, self.opts
        trackers.check_installed(opts.report_to)
        self.manifests = check_shards(cfg.data, need_teachers=opts.alpha > 0)
        check_instructions(self.manifests, cfg.data.train, cfg.model.instructions)
        self.has_pairs = any(m["counts"].get("pairs", 0) for m in self.manifests)
        if cfg.data.eval:
            check_shards(dataclasses.replace(cfg.data, train=cfg.data.eval), need_teachers=opts.alpha > 0)
        resume_from = self._check_out_dir()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        random.seed(opts.seed)
        torch.manual_seed(opts.seed)
        accelerator = self.accelerator = self._accelerator()
        check_data_fits(self.manifests, cfg.data.train, accelerator.num_processes, opts.batch_size)
        self.samples_per_step = accelerator.num_processes * opts.batch_size * opts.grad_accum
        if opts.epochs:  # the schedule, the saving and the end all count optimizer steps
            samples = sum(m["counts"]["samples"] for m in self.manifests)
            per_step = accelerator.num_processes * opts.batch_size * opts.grad_accum
            opts.max_steps = max(1, math.ceil(opts.epochs * samples / per_step))
        with accelerator.main_process_first():  # the tiny base model is built once, by rank 0
            model, self.processor = build_model(cfg, self.run_dir, resume_from)
        if opts.gradient_checkpointing:  # transformers 5 renamed it; older versions have the old name
            enable = getattr(model.base, "activation_checkpointing_enable", None)
            (enable or model.base.gradient_checkpointing_enable)()
        self.collator = Collator.for_model(
            model,
            self.processor,
            max_length=cfg.model.max_length,
            system_prompt=cfg.model.system_prompt,
            cut_points=cfg.data.cut_points,
            seed=opts.seed,
            by_task=True,
            instructions=cfg.model.instructions,
            default_instruction=cfg.model.default_instruction,
            hard_negatives=opts.hard_negatives,
        )
        optimizer = build_optimizer(model, cfg)
        self.scheduler = build_schedule(optimizer, cfg)
        # Under FSDP a forward pass gathers parameters from every rank, so every rank evaluates.
        evaluating = accelerator.is_main_process or accelerator.is_fsdp2
        self.eval_batches = load_eval_batches(cfg, self.collator) if evaluating else []
        self._setup_benchmarks(model, evaluating, resume_from)
        # The scheduler stays outside prepare(): accelerate would step it once per process per
        # call, while train.max_steps counts optimizer steps of the whole run.
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        # After prepare: FSDP replaces the parameters by sharded ones (the optimizer follows).
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        data_position = self._resume(resume_from) if resume_from is not None else None
        self._open_logs()
        self.batches = open_batches(
            cfg.data,
            opts.seed + accelerator.process_index,
            opts.batch_size,
            BatchMaker(self.collator, opts.grad_cache_chunk),
            data_position,
        )

    def _setup_benchmarks(self, model, evaluating: bool, resume_from: Path | None) -> None:
        """``train.benchmarks`` loaded (every rank checks the folders; evaluating ranks keep them)
        and the best-checkpoint record of ``train.best_metric``."""
        from unimm.data.collate import Collator
        from unimm.training.benchmarks import BestCheckpoint, TrainingBenchmarks, check_best_metric

        cfg, opts = self.cfg, self.opts
        benchmarks = TrainingBenchmarks(cfg) if opts.benchmarks else None
        self.benchmarks = benchmarks if evaluating else None
        # embedded as a loaded checkpoint embeds: one view after the last slice, no cut sampling
        self.benchmark_collator = Collator.for_model(
            model,
            self.processor,
            max_length=cfg.model.max_length,
            system_prompt=cfg.model.system_prompt,
            instructions=cfg.model.instructions,  # scored as a checkpoint of this run would be
            default_instruction=cfg.model.default_instruction,
        )
        self.best = None
        if opts.best_metric:
            losses = (
                ["eval_loss_gen", *(["eval_loss_disc"] if opts.alpha > 0 else [])] if cfg.data.eval else []
            )
            check_best_metric(opts.best_metric, [*losses, *(benchmarks.keys() if benchmarks else [])])
            resumed_at = int(resume_from.name.split("-")[-1]) if resume_from is not None else 0
            self.best = BestCheckpoint(self.run_dir, opts.best_metric, opts.best_mode, resumed_at)

    def _evaluate(self) -> bool:
        """This step's evaluations into ``self.last``; whether it is the best step so far (every
        rank gets rank 0's answer: saving is a collective)."""
        model = self.accelerator.unwrap_model(self.model)
        figures: dict[str, float] = {}
        if self.eval_batches:
            figures.update(evaluate(model, self.eval_batches, self.cfg))
        if self.benchmarks is not None:
            figures.update(
                self.benchmarks.evaluate(model, self.benchmark_collator, self.accelerator.autocast)
            )
        self.last.update(figures)
        self.evaluation = (self.step, figures)  # the model card of this step's checkpoint shows them
        if self.best is None:
            return False
        return bool(broadcast_flag(self.best.improves(self.last)))

    def _check_out_dir(self) -> Path | None:
        """The checkpoint to resume from (``--resume``), after refusing to mix runs in one folder."""
        from unimm.model.checkpoint import recover_checkpoints
        from unimm.outputs import claim_output

        cfg, run_dir = self.cfg, self.run_dir
        inputs = [*cfg.data.train, *cfg.data.eval, *([cfg.model.path] if cfg.model.path else [])]
        claim_output(run_dir, "unimm-run", inputs)
        earlier = any(run_dir.glob("step-*")) or (run_dir / "metrics.jsonl").exists()
        if not cfg.resume and earlier:
            raise UnimmError(
                f"--out {run_dir} already holds a run (checkpoints or metrics.jsonl); pass --resume to "
                "continue it, or choose another --out"
            )
        if not cfg.resume:
            return None
        main = int(os.environ.get("RANK", "0")) == 0  # the accelerator does not exist yet
        if main:
            recover_checkpoints(run_dir)
        resume_from = _latest_checkpoint(run_dir)
        if main and resume_from is None and (run_dir / "metrics.jsonl").exists():
            # killed before its first checkpoint: nothing to continue, so the run starts again
            _truncate_metrics(run_dir / "metrics.jsonl", 0)
        return resume_from

    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs

        # accelerate keeps one state per process; a second run in the same process (a notebook,
        # the tests) may ask for another precision. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(self.opts.mixed_precision),
            gradient_accumulation_steps=self.opts.grad_accum,
            # Unused parameters are normal here (the head when α = 0, the LM head when gen_weight = 0).
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
            # Without it, accelerate treats several CPU processes (torchrun) as one and skips DDP.
            cpu=not torch.cuda.is_available(),
            **trackers.accelerator_options(self.opts.report_to, self.run_dir),
        )
        check_parallelism(accelerator)
        return accelerator

    def _resume(self, checkpoint: Path) -> Any:
        """Restore optimizer, scheduler, RNG and counters; return this rank's data position."""
        from unimm.model.checkpoint import load_train_state, restore_train_state

        meta = restore_train_state(
            load_train_state(checkpoint),
            self.model,
            self.optimizer,
            self.scheduler,
            rank=self.accelerator.process_index,
            world=self.accelerator.num_processes,
        )
        self.step = int(meta["step"])
        self.history.update(meta.get("history", {}))
        if self.accelerator.is_main_process:
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        return meta["data_position"]

    def _open_logs(self) -> None:
        from unimm.utils import progress_bar

        main = self.accelerator.is_main_process
        self.bar = progress_bar(
            total=self.opts.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (self.progress and main),
        )
        self.metrics_file = (self.run_dir / "metrics.jsonl").open("a", encoding="utf-8") if main else None
        self.tracking = trackers.start(
            self.accelerator, self.opts.report_to, self.run_dir, self.opts.run_name, config_to_dict(self.cfg)
        )

    # -- train ---------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Optimizer steps up to ``train.max_steps``: log, evaluate and save on their schedules."""
        opts = self.opts
        fault_after = int(os.environ[_FAULT_ENV]) if os.environ.get(_FAULT_ENV) else None
        while self.step < opts.max_steps:
            self.last = self.optimizer_step()
            best = bool(opts.eval_every) and self.step % opts.eval_every == 0 and self._evaluate()
            if self.metrics_file is not None and self.step % opts.log_every == 0:
                self.metrics_file.write(json.dumps(self.last) + "\n")
                self.metrics_file.flush()
            if self.tracking and self.step % opts.log_every == 0:
                trackers.log(self.accelerator, self.last, self.samples_per_step)
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{self.last['loss']:.4f}",
                gen=f"{self.last['loss_gen']:.3f}",
                disc=f"{self.last['loss_disc']:.4f}",
                **({"pair": f"{self.last['loss_pair']:.4f}"} if self.has_pairs else {}),
            )
            if fault_after is not None and self.step == fault_after:
                os._exit(75)  # testing hook: die like a killed run (see _FAULT_ENV)
            if best or self.step % opts.save_every == 0 or self.step == opts.max_steps:
                self.save()
            if best and self.accelerator.is_main_process:
                self.best.record(self.step, self.last)
        if opts.merge_lora:
            self._save_merged()
        return {**self.last, "history": self.history, "main": self.accelerator.is_main_process}

    def optimizer_step(self) -> dict[str, Any]:
        """``train.grad_accum`` micro-steps and one optimizer step (skipped when a loss was not
        finite); the step's metrics."""
        opts, history = self.opts, self.history
        start = time.perf_counter()
        parts, gen, disc, pair, views, tokens, skipped = [], 0.0, 0.0, 0.0, 0, 0, False
        for _ in range(opts.grad_accum):
            payload, corrupt = self.batches.next()
            history["corrupt_samples"] += corrupt
            result, finite, logged = self._micro_step(payload)
            skipped = skipped or not finite
            parts.append(logged)
            gen += result.loss_gen / opts.grad_accum
            disc += result.loss_disc / opts.grad_accum
            pair += result.loss_pair / opts.grad_accum
            views += result.views
            tokens += result.tokens
        grad_norm = self._apply_gradients(skipped)
        self.step += 1
        seconds = time.perf_counter() - start
        return {
            "step": self.step,
            "loss": sum(parts) / len(parts),
            "loss_gen": gen,
            "loss_disc": disc,
            **({"loss_pair": pair} if self.has_pairs else {}),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "views": views,
            "tokens": tokens,
            "tokens_per_s": tokens / seconds if seconds else None,
            "seconds": seconds,
            "skipped": skipped,
        }

    def _micro_step(self, payload) -> tuple[Any, bool, float]:
        """Forward and backward of one micro-batch (or its gradient-cache chunks): the step's
        result, whether its loss was finite, and the objective to log."""
        opts, accelerator, model = self.opts, self.accelerator, self.model
        for chunk in payload if opts.grad_cache_chunk else [payload]:
            for task in chunk.get("tasks", ()):
                self.history["samples"][task] += 1
        if opts.grad_cache_chunk:
            self.history["dropped_slices"] += sum(c["dropped_slices"] for c in payload)
            result = train_step_cached(
                model,
                payload,
                self.cfg,
                lambda loss: accelerator.backward(loss / opts.grad_accum),
                lambda: accelerator.no_sync(model),
                pairs=self.has_pairs,
            )
            finite = math.isfinite(result.objective)
            return result, finite, result.objective
        self.history["dropped_slices"] += payload["dropped_slices"]
        with accelerator.accumulate(model):
            result = train_step(model, payload, self.cfg, pairs=self.has_pairs)
            finite = bool(torch.isfinite(result.loss))  # one device sync per micro-step
            if finite:
                accelerator.backward(result.loss / opts.grad_accum)
        return result, finite, result.objective if finite else float("nan")

    def _apply_gradients(self, skipped: bool) -> float | None:
        """Clip, step the optimizer and the schedule; or drop the gradients of a skipped step."""
        history = self.history
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            history["nonfinite"] += 1
            history["nonfinite_total"] += 1
            if history["nonfinite"] >= self.opts.max_nonfinite:
                raise UnimmError(
                    f"{history['nonfinite']} steps in a row had a non-finite loss (last at step "
                    f"{self.step + 1}); lower train.lr, use train.mixed_precision=bf16 instead of fp16, or "
                    "check the data"
                )
            return None
        history["nonfinite"] = 0
        grad_norm = None
        if self.opts.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(self.params, self.opts.max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # -- save ----------------------------------------------------------------------------------

    def save(self) -> None:
        """Checkpoint the current step (a collective: every rank calls it; rank 0 writes)."""
        from unimm.model.checkpoint import (
            gather_training_state,
            pack_train_state,
            rank_state,
            save_checkpoint,
        )

        accelerator, cfg = self.accelerator, self.cfg
        model_state, optimizer_state = gather_training_state(accelerator, self.model, self.optimizer)
        rank_states = gather_objects(rank_state(self.batches.position))
        if accelerator.is_main_process:
            state = pack_train_state(
                optimizer_state, self.scheduler, rank_states, {"step": self.step, "history": self.history}
            )
            meta = {
                "recipe": config_to_dict(cfg),
                "step": self.step,
                "data_manifests": [m["fingerprint"] for m in self.manifests],
                "parallelism": {
                    "kind": accelerator.distributed_type.value,
                    "processes": accelerator.num_processes,
                    "mixed_precision": accelerator.mixed_precision,  # train.mixed_precision=auto resolved
                },
                # What inference rebuilds the inputs with (the checkpoint adds dtype, pooling, size).
                "inference": {
                    "system_prompt": cfg.model.system_prompt,
                    "max_length": cfg.model.max_length,
                    "attn_implementation": cfg.model.attn_implementation,
                    "dimensions": [cfg.model.embed_dim, *cfg.model.matryoshka],
                    "instructions": cfg.model.instructions,
                    "default_instruction": cfg.model.default_instruction,
                },
            }
            if self.evaluation[0] == self.step:
                meta["evaluation"] = self.evaluation[1]
            save_checkpoint(
                self.run_dir / f"step-{self.step:06d}",
                accelerator.unwrap_model(self.model),
                self.processor,
                meta,
                train_state=state,
                state_dict=model_state,
            )
            _prune(self.run_dir, self.opts.keep_last, self.best.folder() if self.best else None)
        accelerator.wait_for_everyone()

    def _save_merged(self) -> None:
        """``RUN/final-merged``: LoRA folded into the weights of the final checkpoint."""
        from unimm.model.checkpoint import load_checkpoint, save_checkpoint

        if not self.accelerator.is_main_process:
            return
        # From the final checkpoint, not the live model: its parameters may be sharded (FSDP).
        final, processor, meta = load_checkpoint(self.run_dir / f"step-{self.step:06d}")
        keep = ("recipe", "step", "data_manifests", "inference", "evaluation")
        save_checkpoint(
            self.run_dir / "final-merged",
            final,
            processor,
            {k: meta[k] for k in keep if k in meta},
            merge_lora=True,
        )

    # -- cleanup -------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Close the data stream (its worker processes), the progress bar and the metrics log."""
        if self.batches is not None:
            self.batches.close()
        if self.bar is not None:
            self.bar.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.tracking:
            trackers.end(self.accelerator)


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
            '"$(unimm recipes --path accelerate/fsdp)") or with DDP (accelerate/ddp, or torchrun) — with '
            "LoRA a 7B model fits one GPU per process, and train.grad_cache_chunk grows the global batch "
            "past memory"
        )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written after the checkpoint a run resumes from), and a
    torn last line (a crash in the middle of writing it); rewritten atomically."""
    from unimm.utils import atomic_write_bytes

    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                break  # torn by a crash: it is past every checkpoint anyway
            raise UnimmError(f"{path}, line {number}: not a JSON line; the metrics file is damaged") from None
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def _prune(run_dir: Path, keep: int, best: Path | None = None) -> None:
    """Remove all but the last ``keep`` checkpoints, never the best one."""
    steps = sorted(run_dir.glob("step-*"))
    for old in steps[:-keep]:
        if old != best:
            shutil.rmtree(old, ignore_errors=True)
