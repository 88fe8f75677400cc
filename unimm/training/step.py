"""One training step: ``L = gen_weight·L_g + α·L_d + pair_weight·L_p`` on a (micro-)batch, and
fixed-batch evaluation.

Distributed: ``L_d`` and ``L_p`` are computed over the *global* batch — view embeddings are
gathered from every rank (the local part keeps its gradient), the targets are computed from every
rank's teacher features and every rank's pairs take every rank's positives and hard negatives as
candidates — and scaled by the world size, while ``L_g`` is normalised by the global number of
labelled tokens; averaging gradients over ranks (DDP, FSDP) then gives exactly the single-process
gradient of the same global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING

import torch

from unimm.training.distributed import gather_pairs, gather_views, global_sum, rank_and_world
from unimm.training.losses import alignment_losses, structure_loss

if TYPE_CHECKING:
    from unimm.config import TrainConfig


@dataclasses.dataclass
class StepResult:
    loss: torch.Tensor
    """What this rank back-propagates (scaled so that DDP's average is the global gradient)."""
    objective: float
    """The global objective ``gen_weight·L_g + α·L_d + pair_weight·L_p``, the same on every rank."""
    loss_gen: float
    loss_disc: float
    views: int
    tokens: int
    loss_pair: float = 0.0


def uses_views(cfg: TrainConfig, pairs: bool) -> bool:
    """Whether a step embeds views: for the structural loss, or for the pair loss when the data
    has pair records (the same answer on every rank: the steps' collectives depend on it)."""
    return cfg.train.alpha > 0 or (pairs and cfg.train.pair_weight > 0)


def _alignment(embeddings, teacher, views, pairs, cfg: TrainConfig, with_pairs: bool):
    """``(α·L_d + pair_weight·L_p, L_d, L_p)`` over the global batch of this rank's views;
    ``with_pairs``: the data has pair records (else no rank gathers any, one collective less)."""
    n_local = len(views)
    global_embeddings, teacher, views = gather_views(embeddings, teacher, views)
    global_pairs = gather_pairs(pairs, n_local) if with_pairs else []
    disc, pair = alignment_losses(global_embeddings, teacher, views, global_pairs, cfg)
    return cfg.train.alpha * disc + cfg.train.pair_weight * pair, float(disc.detach()), float(pair.detach())


def _merge_views(chunks: list[dict]) -> tuple[list, list[tuple[int, int]], list]:
    """The chunks' teachers, views and pairs as one batch's (rows and view indices moved along)."""
    teacher, views, pairs, offset = [], [], [], 0
    for chunk in chunks:
        at = len(views)
        pairs.extend((q + at, p + at, [n + at for n in neg]) for q, p, neg in chunk.get("pairs", []))
        views.extend((b + offset, c) for b, c in chunk["views"])
        teacher.extend(chunk["teacher"])
        offset += len(chunk["teacher"])
    return teacher, views, pairs


def train_step_cached(
    model, chunks: list[dict], cfg: TrainConfig, backward, no_sync, *, pairs: bool = False
) -> StepResult:
    """One step with gradient caching (Gao et al. 2021); runs the backward passes itself.

    1. Embed every chunk without gradients (each chunk's RNG state is saved).
    2. ``L_d`` over all embeddings of the global batch, differentiated to the embeddings only.
    3. Each chunk again with gradients under its saved RNG state; back-propagate
       ``embeddings · ∂L_d/∂embeddings`` plus the chunk's share of ``L_g``.

    Args:
        backward: ``loss -> None`` (the accelerator's backward).
        no_sync: context manager that defers DDP's gradient sync (used for all but the last chunk).
        pairs: the training data has pair records (their loss needs the views even at α = 0).
    """
    opts = cfg.train
    _, world = rank_and_world()
    use_views = uses_views(cfg, pairs)
    states, embedded = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_rng_state())
            if use_views:
                embedded.append(model(chunk, with_lm=False, with_views=True).embeddings)
    grads: list[torch.Tensor | None] = [None] * len(chunks)
    loss_disc = loss_pair = 0.0
    if use_views:
        local = torch.cat(embedded).requires_grad_()
        weighted, loss_disc, loss_pair = _alignment(local, *_merge_views(chunks), cfg, pairs)
        (grad,) = torch.autograd.grad(weighted * world, local, allow_unused=True)
        grad = torch.zeros_like(local) if grad is None else grad
        grads = list(torch.split(grad, [e.shape[0] for e in embedded]))
    tokens = [int((c["labels"][:, 1:] != -100).sum()) for c in chunks]
    global_tokens = global_sum(float(sum(tokens))) if opts.gen_weight > 0 else 0.0
    loss_gen = 0.0
    after = _rng_state()
    for k, chunk in enumerate(chunks):
        _set_rng_state(states[k])  # the same dropout as in step 1
        context = no_sync() if k < len(chunks) - 1 else contextlib.nullcontext()
        with context:
            out = model(chunk, with_lm=opts.gen_weight > 0, with_views=use_views)
            loss = torch.zeros((), device=next(model.parameters()).device)
            if opts.gen_weight > 0 and global_tokens:
                share = tokens[k] / global_tokens
                loss = loss + opts.gen_weight * out.loss_gen * share * world
                loss_gen += float(out.loss_gen.detach()) * share
            if use_views:
                loss = loss + (out.embeddings * grads[k].to(out.embeddings)).sum()
            backward(loss)
    _set_rng_state(after)
    loss_gen = global_sum(loss_gen)
    objective = opts.gen_weight * loss_gen + opts.alpha * loss_disc + opts.pair_weight * loss_pair
    views_count = sum(len(c["views"]) for c in chunks)
    return StepResult(
        torch.tensor(objective), objective, loss_gen, loss_disc, views_count, sum(tokens), loss_pair
    )


def _rng_state() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


@torch.no_grad()
def evaluate(model, batches: list[dict], cfg: TrainConfig) -> dict[str, float]:
    """Mean ``L_g`` and ``L_d`` over fixed batches of this process (under FSDP every rank calls it)."""
    was_training = model.training
    model.eval()
    gen, disc = [], []
    for batch in batches:
        out = model(batch, with_lm=True, with_views=cfg.train.alpha > 0)
        gen.append(float(out.loss_gen))
        if cfg.train.alpha > 0 and out.embeddings is not None:
            disc.append(float(structure_loss(out.embeddings, batch["teacher"], batch["views"], cfg)))
    model.train(was_training)
    result = {"eval_loss_gen": sum(gen) / len(gen)}
    if disc:
        result["eval_loss_disc"] = sum(disc) / len(disc)
    return result


def load_eval_batches(cfg: TrainConfig, collator) -> list[dict]:
    """The first ``train.eval_batches`` batches of ``data.eval``, collated once (none when disabled)."""
    from unimm.data.shards import read_samples

    if not cfg.data.eval or cfg.train.eval_every <= 0:
        return []
    samples = []
    wanted = cfg.train.eval_batches * cfg.train.batch_size
    for folder in cfg.data.eval:
        for sample in read_samples(folder, split_by_node=False, split_by_worker=False):
            samples.append(sample)
            if len(samples) >= wanted:
                break
    size = cfg.train.batch_size
    return [collator(samples[i : i + size]) for i in range(0, len(samples), size)]


def train_step(model, batch: dict, cfg: TrainConfig, *, pairs: bool = False) -> StepResult:
    """Loss of one (micro-)batch; call ``.loss.backward()`` (or the accelerator's) on the result.

    ``loss = gen_weight·L_g + α·L_d + pair_weight·L_p``, normalised so that averaging gradients
    over ranks gives the gradient of the global batch (see the module docs); ``pairs``: the
    training data has pair records (their loss needs the views even at α = 0).
    """
    opts = cfg.train
    _, world = rank_and_world()
    need_views = uses_views(cfg, pairs)
    out = model(batch, with_lm=opts.gen_weight > 0, with_views=need_views)
    loss = torch.zeros((), device=next(model.parameters()).device)
    loss_gen = loss_disc = loss_pair = 0.0
    tokens = out.label_tokens
    if opts.gen_weight > 0:
        global_tokens = global_sum(float(tokens))
        # local mean × (local share of the global tokens) × world = this rank's part of the global mean
        scale = world * tokens / global_tokens if global_tokens else 0.0
        loss = loss + opts.gen_weight * out.loss_gen * scale
        loss_gen = float(out.loss_gen.detach()) * tokens / global_tokens * world if global_tokens else 0.0
    if need_views:
        weighted, loss_disc, loss_pair = _alignment(
            out.embeddings, batch["teacher"], batch["views"], batch.get("pairs", []), cfg, pairs
        )
        loss = loss + weighted * world
    if world > 1:  # report the global mean of L_g
        loss_gen = global_sum(loss_gen) / world
    objective = opts.gen_weight * loss_gen + opts.alpha * loss_disc + opts.pair_weight * loss_pair
    return StepResult(loss, objective, loss_gen, loss_disc, len(batch.get("views", [])), tokens, loss_pair)
