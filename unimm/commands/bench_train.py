"""Training throughput benchmarks, ours against a baseline in the same run, as ratios.

unimm bench train     # step time: joint training vs generative-only on the same batch
unimm bench data      # batches/s: worker processes and the prefetch thread vs the training loop
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path


def bench_train(
    *,
    steps: int = 20,
    batch_size: int = 8,
    cut_points: int = 4,
    repeats: int = 3,
    hidden_size: int = 64,
    layers: int = 2,
    device: str = "cpu",
    mixed_precision: str = "no",
    peak_tflops: float | None = None,
    recipe: str = "tiny-cpu",
    overrides: list[str] | None = None,
    family: str = "llava",
) -> list[dict]:
    """Step time of joint training (α = 1) against generative-only (α = 0, no views), same batch.

    Builds a synthetic set, tiny teachers, shards and a random model of ``family`` (default
    LLaVA: CLIP vision tower + Llama; any of :data:`unimm.tiny.models.FAMILIES`, e.g. ``qwen2_vl``)
    with a language model of ``layers`` × ``hidden_size`` (the vision tower frozen, the rest
    trained) in a temporary folder; each variant runs ``steps`` optimizer steps on one fixed batch
    (forward, backward, update), the variants interleaved, best of ``repeats``.

    Model FLOPs per token are estimated as ``6·N + 12·L·H·T`` (N: language model parameters
    without embeddings, L layers, H width, T tokens per sample; the frozen vision tower and the
    retrieval head are left out), so ``model_tflops_per_s`` and ``mfu`` (with ``peak_tflops``)
    slightly understate the work done.

    ``recipe`` and ``overrides`` (``KEY=VALUE``) configure both variants' training, except the keys
    that define the variants (:data:`VARIANT_KEYS`, refused).

    Raises:
        ConfigError: a broken recipe or override, before any work.
    """
    _check_train_settings(recipe, overrides or [])
    _check_family(family)
    work = Path(tempfile.mkdtemp(prefix="unimm-bench-train-"))
    try:
        shards, llava = _tiny_training_set(work, max(64, batch_size), hidden_size, layers, family)
        samples = _first_samples(shards, batch_size)
        setups = {
            name: _variant(
                work, name, alpha, (shards, llava, samples), cut_points, device, recipe, overrides or []
            )
            for name, alpha in (("joint", 1.0), ("generative-only", 0.0))
        }
        times = _time_variants(setups, steps, repeats, device, mixed_precision)
        label = f"{family}: language model {layers} x {hidden_size}"
        context = {"batch": batch_size, "device": device, "mixed_precision": mixed_precision}
        return _train_rows(setups, times, layers * hidden_size, peak_tflops, label, context)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _train_rows(setups: dict, times: dict, depth_width: int, peak_tflops, label: str, context: dict):
    """One row per variant: step time, its ratio to generative-only, tokens/s, model FLOP/s."""
    from unimm.model.parts import find_parts

    batch = setups["joint"][2]
    language_model = find_parts(setups["joint"][1].base).language
    n_params = sum(p.numel() for n, p in language_model.named_parameters() if "embed_tokens" not in n)
    tokens = int(batch["attention_mask"].sum())
    per_sample = batch["attention_mask"].shape[1]
    flops_per_token = 6 * n_params + 12 * depth_width * per_sample
    base = min(times["generative-only"])
    rows = []
    for name in setups:
        best = min(times[name])
        achieved = flops_per_token * tokens / best / 1e12
        rows.append(
            {
                "variant": name,
                "step_s": float(f"{best:.4g}"),  # 4 significant digits: tiny models step in ms
                "ratio_vs_generative_only": round(best / base, 3),
                "tokens_per_s": round(tokens / best, 1),
                "model_tflops_per_s": round(achieved, 4),
                "flops_per_token": flops_per_token,
                "seq_len": per_sample,
                "mfu": round(achieved / peak_tflops, 4) if peak_tflops else None,
                "views": len(batch["views"]) if name == "joint" else 0,
                "tokens": tokens,
                "model": f"{label} ({n_params / 1e6:.1f} M)",
                **context,
            }
        )
    return rows


def _check_family(family: str) -> None:
    from unimm.errors import UnimmError
    from unimm.tiny.models import FAMILIES

    if family not in FAMILIES:
        raise UnimmError(f"--family {family}: use one of {', '.join(FAMILIES)}")


def _tiny_training_set(
    work: Path, records: int, hidden_size: int, layers: int, family: str = "llava"
) -> tuple[Path, Path]:
    """Synthetic records prepared into shards with tiny teachers, and a tiny model of ``family``."""
    from unimm.config import DataOptions, PrepareConfig, build_config
    from unimm.data.prepare import write_shards
    from unimm.data.stream import training_texts
    from unimm.data.synthetic import write_synthetic
    from unimm.tiny import save_tiny_teachers
    from unimm.tiny.models import save_tiny_mllm

    data = write_synthetic(work / "data", records)
    teachers = save_tiny_teachers(work / "teachers")
    shards = work / "shards"
    options = {"prepare.inputs": [str(data)], "prepare.out": str(shards)}
    options.update({f"teachers.{k}": str(v) for k, v in teachers.items()})
    write_shards(build_config(PrepareConfig, recipe="tiny-cpu", options=options), progress=False)
    texts = training_texts(DataOptions(train=[str(shards)]))
    model = save_tiny_mllm(work / "model", family, texts, hidden_size=hidden_size, num_layers=layers)
    return shards, model


def _first_samples(shards: Path, count: int) -> list:
    from unimm.data.shards import read_samples

    return list(read_samples(shards, split_by_node=False, split_by_worker=False))[:count]


VARIANT_KEYS = ("train.alpha", "data.train", "data.cut_points", "model.path", "model.tiny")


def _check_train_settings(recipe: str, overrides: list[str]) -> None:
    from unimm.config.commands import check_settings

    owned = {key: "the benchmark sets it (it defines the variants)" for key in VARIANT_KEYS}
    check_settings(
        recipe, overrides, owned=owned, sections=("model", "data", "align", "train"), what="training"
    )


def _variant(
    work: Path, name: str, alpha: float, inputs, cut_points: int, device: str, recipe: str, user: list
):
    """``(cfg, model, batch, optimizer)`` of one variant: the recipe and ``user`` overrides, then
    ``alpha``, the tiny model and the inputs ``(shards, llava, samples)``."""
    import torch

    from unimm.config import TrainConfig, build_config
    from unimm.data.collate import Collator
    from unimm.training.trainer import build_model

    shards, llava, samples = inputs
    overrides = [*user, f"data.train={shards}", f"train.alpha={alpha}", f"data.cut_points={cut_points}"]
    overrides += ["model.tiny=false", f"model.path={llava}"]
    cfg = build_config(TrainConfig, recipe=recipe, options={"out": str(work / name)}, overrides=overrides)
    (work / name).mkdir()
    model, processor = build_model(cfg, work / name, None)
    model.to(device)
    batch = Collator.for_model(model, processor, max_length=cfg.model.max_length, cut_points=cut_points)(
        samples
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return cfg, model, batch, optimizer


def _time_variants(
    setups: dict, steps: int, repeats: int, device: str, mixed_precision: str
) -> dict[str, list]:
    """Seconds per optimizer step of each variant: one warm-up, then ``repeats`` interleaved runs."""
    import contextlib

    import torch

    from unimm.training.step import train_step

    def autocast():
        if mixed_precision == "bf16":
            return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def steps_of(name: str) -> float:
        cfg, model, batch, optimizer = setups[name]
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            with autocast():
                result = train_step(model, batch, cfg)
            result.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync()
        return (time.perf_counter() - start) / steps

    for name in setups:
        steps_of(name)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(repeats):
        for name in setups:
            times[name].append(steps_of(name))
    return times


def _data_collator(folder: Path, family: str, image_size: int):
    """The collator of a tiny ``family`` model for ``image_size`` images, and the image tokens
    one such image becomes."""
    from PIL import Image

    from unimm.data.collate import Collator
    from unimm.model.core import RetrievalHead, UnimmModel, load_mllm
    from unimm.tiny import save_tiny_llava
    from unimm.tiny.models import save_tiny_mllm

    if family == "llava":
        save_tiny_llava(folder, ["a red square"], image_size=image_size, patch_size=14)
    else:
        save_tiny_mllm(folder, family, ["a red square"], image_size=image_size)
    mllm, processor = load_mllm(folder)
    model = UnimmModel(mllm, RetrievalHead(mllm.config.text_config.hidden_size, 16))
    collator = Collator.for_model(model, processor, max_length=4096, cut_points=4)
    probe = processor.tokenizer(collator.image_text(Image.new("RGB", (image_size, image_size))))
    return collator, probe["input_ids"].count(model.image_token_id)


def bench_data(
    *,
    records: int = 256,
    batch_size: int = 16,
    image_size: int = 336,
    batches: int = 24,
    workers: tuple[int, ...] = (1, 2, 4),
    repeats: int = 2,
    family: str = "llava",
) -> list[dict]:
    """Batches/s of the training data path (read, decode JPEGs, image processor, tokenise, collate).

    The baseline makes each batch in the training loop when it is needed (``data.workers=0,
    data.prefetch=0``); the variants are the prefetch thread and ``data.workers`` processes. Images
    are re-encoded to ``image_size`` and the processor is a CLIP one of that size with 14-pixel
    patches (LLaVA-1.5 at 336: 576 image tokens per image); another ``family`` uses its tiny
    model's own processor (Qwen-VL: dynamic resolution up to ``image_size``, 8-pixel patches
    merged 2 × 2; the others' tiny towers take 32 pixels). Nothing trains meanwhile, so this is
    the data path's own throughput; the time to start the workers is left out (first batch).
    """
    from unimm.config import DataOptions, PrepareConfig, build_config
    from unimm.data.prepare import write_shards as prepare
    from unimm.data.stream import BatchMaker, open_batches
    from unimm.data.synthetic import write_synthetic

    _check_family(family)
    work = Path(tempfile.mkdtemp(prefix="unimm-bench-data-"))
    try:
        data = write_synthetic(work / "data", records)
        options = {"prepare.inputs": [str(data)], "prepare.out": str(work / "shards")}
        options["prepare.image_size"] = image_size
        prepare(build_config(PrepareConfig, options=options), progress=False)
        collator, image_tokens = _data_collator(work / "model", family, image_size)
        make = BatchMaker(collator)

        def rate(n_workers: int, prefetch: int, verify: str) -> float:
            shards = [str(work / "shards")]
            options = DataOptions(train=shards, workers=n_workers, prefetch=prefetch, verify=verify)
            source = open_batches(options, 0, batch_size, make)
            try:
                source.next()  # started (workers forked, buffers filled)
                start = time.perf_counter()
                for _ in range(batches):
                    source.next()
                return batches / (time.perf_counter() - start)
            finally:
                source.close()

        # every variant verifies the shards as it reads them (data.verify=full, the default); the
        # unverified loop shows what the sha256 costs
        variants = [("in the loop", 0, 0, "full"), ("in the loop, data.verify=off", 0, 0, "off")]
        variants += [("prefetch thread", 0, 2, "full")]
        variants += [(f"{n} worker process{'es' if n > 1 else ''}", n, 2, "full") for n in workers]
        best: dict[str, float] = {}
        for _ in range(repeats):
            for name, n_workers, prefetch, verify in variants:
                best[name] = max(best.get(name, 0.0), rate(n_workers, prefetch, verify))
        base = best["in the loop"]
        return [
            {
                "variant": name,
                "workers": n_workers,
                "batches_per_s": round(best[name], 2),
                "samples_per_s": round(best[name] * batch_size, 1),
                "ratio": round(best[name] / base, 2),
                "batch": batch_size,
                "image": f"{image_size}px, {image_tokens} tokens",
                "family": family,
                "cpus": os.cpu_count(),
            }
            for name, n_workers, _, _ in variants
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
