"""The optimizer and the learning-rate schedule of ``unimm train`` (section ``train``).

Parameter groups: the retrieval head (``train.head_lr``), the LoRA adapters (``train.lora_lr``),
the vision–language connector (``train.projector_lr``) and the rest (``train.lr``); in each,
matrices take ``train.weight_decay`` and biases and normalisation weights (1-D tensors) none, as
is usual. The schedule warms up linearly over ``train.warmup_ratio`` of ``train.max_steps`` and
then decays (cosine or linear to 0) or stays constant.
"""

from __future__ import annotations

import math

import torch

from unimm.config import TrainConfig


def parameter_groups(model, cfg: TrainConfig) -> list[dict]:
    """The trainable parameters in groups by part and by decay (empty groups left out); each group
    carries its ``name`` (``head``, ``lora``, ``projector``, ``rest``, with ``/no_decay``)."""
    from unimm.model.parts import find_parts

    opts = cfg.train
    connector = {id(p) for p in find_parts(model.mllm).connector.parameters()}
    rates = {"head": opts.head_lr, "lora": opts.lora_lr, "projector": opts.projector_lr, "rest": None}
    groups: dict[str, list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = (
            "head"
            if name.startswith("head.")
            else "lora"
            if "lora_" in name
            else "projector"
            if id(param) in connector
            else "rest"
        )
        key = part if param.ndim >= 2 else f"{part}/no_decay"
        groups.setdefault(key, []).append(param)
    return [
        {
            "name": key,
            "params": params,
            "lr": rates[key.split("/")[0]] or opts.lr,
            "weight_decay": 0.0 if key.endswith("/no_decay") else opts.weight_decay,
        }
        for key, params in groups.items()
    ]


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``train.optimizer`` over :func:`parameter_groups`."""
    groups = parameter_groups(model, cfg)
    name, lr = cfg.train.optimizer, cfg.train.lr
    if name == "adamw":
        on_cuda = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=lr, **({"fused": True} if on_cuda else {}))
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    return torch.optim.Adafactor(groups, lr=lr)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """The multiplier of the base learning rates at optimizer step ``step`` (0-based)."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_schedule(optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The warm-up and ``train.lr_schedule`` over ``train.max_steps`` optimizer steps."""
    opts = cfg.train
    warmup = math.ceil(opts.warmup_ratio * opts.max_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, opts.max_steps, opts.lr_schedule)
    )
