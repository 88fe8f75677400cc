"""``unimm quickstart``: the whole pipeline on a synthetic dataset, offline, on a CPU, in minutes.

    unimm quickstart --out unimm-quickstart

Stages: draw a synthetic interleaved dataset (training and evaluation files), write tiny teacher
encoders (CLIP fitted on the training captions), prepare shards with teacher features, train the
tiny model (the shipped ``tiny-cpu`` recipe), embed the evaluation shards, retrieve, evaluate, chat
once about an image, plot, and summarise. Each stage prints the equivalent ``unimm`` command.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import platform
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

import typer

from unimm.config import PrepareConfig, build_config
from unimm.utils import atomic_write_bytes, atomic_write_json, environment

RECIPE = "tiny-cpu"  # a shipped recipe (recipes/tiny-cpu.yaml)

# Keys the quickstart sets itself (paths between its stages, and its own flags): a --set of one
# would break the pipeline, so it is refused with the flag to use instead.
OWNED = {
    "out": "--out",
    "resume": "",
    "prepare.inputs": "",
    "prepare.out": "--out",
    "prepare.workers": "--workers",
    "prepare.overwrite": "",
    "teachers.image_expert": "",
    "teachers.text_expert": "",
    "teachers.clip": "",
    "data.train": "",
    "train.max_steps": "--steps",
    "train.save_every": "--steps",
    "train.seed": "--seed",
    "embed.model": "",
    "embed.data": "",
    "embed.out": "--out",
    "retrieve.model": "",
    "retrieve.index": "",
    "retrieve.query": "",
    "eval.model": "",
    "eval.data": "--eval-records",
    "eval.out": "--out",
    "chat.model": "",
    "chat.prompt": "",
    "chat.images": "",
}


# The instruction set the README's figures were computed with. Math libraries pick kernels per
# instruction set, the kernels sum in different orders, and after 1500 steps the rounding shows in
# the figures. Capped at AVX2 (ATen, MKL and oneDNN each have their own switch), an AVX-512 CPU
# prints the summary of the AVX2 one the README's came from, digit for digit, at no measurable cost
# (docs/benchmarks.md#across-cpus); CPUs whose libraries still choose other kernels (Intel's MKL
# and oneDNN may block for their caches; arm64) print figures within the README's CI bands.
CPU_CODE_PATHS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}


def pin_cpu_code_paths() -> dict[str, str]:
    """Cap torch's CPU kernels at AVX2 on x86-64 (the README's figures), for this process and
    the ones it starts; return the variables set. A variable already set is left as it is (set
    ``ATEN_CPU_CAPABILITY=default`` and the others yourself to run other code paths). Takes effect
    only before the first torch operation of the process: the libraries read these once."""
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return {}
    pins = {key: value for key, value in CPU_CODE_PATHS.items() if key not in os.environ}
    os.environ.update(pins)
    return pins


@dataclasses.dataclass(frozen=True)
class Settings:
    """The recipe and ``--set`` overrides every stage's config is built from (user's last)."""

    recipe: str = RECIPE
    overrides: tuple[str, ...] = ()
    sections: frozenset[str] = dataclasses.field(default=frozenset(), init=False)
    """The recipe's sections (read once, when checked)."""

    def __post_init__(self) -> None:
        from unimm.config.commands import check_settings

        reasons = {
            key: "the quickstart sets it itself" + (f" (use {flag})" if flag else "")
            for key, flag in OWNED.items()
        }
        recipe = check_settings(self.recipe, self.overrides, owned=reasons)
        object.__setattr__(self, "sections", frozenset(recipe))

    def _mine(self, cls: type) -> list[str]:
        from unimm.config.commands import override_key

        own = {f.name for f in dataclasses.fields(cls)}
        return [t for t in self.overrides if override_key(t).split(".", 1)[0] in own]

    def build(self, cls: type, options: dict[str, Any], overrides: tuple[str, ...] = ()):
        """``cls``'s config: the recipe, then the quickstart's ``options``/``overrides``, then ``--set``."""
        every = [*overrides, *self._mine(cls)]
        return build_config(cls, recipe=self.recipe, options=options, overrides=every)

    def flags(self, cls: type, overrides: tuple[str, ...] = ()) -> list[str]:
        """The ``--recipe``/``--set`` flags of the equivalent command (``--recipe`` when the recipe
        has a section of that command)."""
        own = {f.name for f in dataclasses.fields(cls)}
        args = ["--recipe", str(self.recipe)] if own & self.sections else []
        for item in [*overrides, *self._mine(cls)]:
            args += ["--set", item]
        return args


def _stage(title: str, command: str | list[str] | None = None) -> None:
    typer.secho(f"\n==> {title}", fg=typer.colors.CYAN, bold=True)
    if command:
        typer.echo(f"    $ {command if isinstance(command, str) else shlex.join(command)}")


def _python(code: str) -> str:
    return f'python -c "{code}"'


def _prepare(
    settings: Settings,
    title: str,
    data: Path,
    shards: Path,
    teachers: dict[str, Path],
    workers: int,
    progress: bool,
):
    from unimm.commands.prepare import run as prepare

    args = ["unimm", "prepare", str(data), "--out", str(shards), *settings.flags(PrepareConfig)]
    args += ["--workers", str(workers), "--overwrite"]
    for key in ("image_expert", "text_expert", "clip"):
        args += [f"--teacher-{key.replace('_', '-')}", str(teachers[key])]
    _stage(title, args)
    options = {
        "prepare.inputs": [str(data)],
        "prepare.out": str(shards),
        "prepare.workers": workers,
        "prepare.overwrite": True,
        **{f"teachers.{k}": str(v) for k, v in teachers.items()},
    }
    return prepare(settings.build(PrepareConfig, options), progress=progress)


def _mean(rows: list[dict], key: str) -> float:
    return round(sum(r[key] for r in rows) / len(rows), 3)


def run(
    out_dir: str | Path = "unimm-quickstart",
    *,
    records: int = 1000,
    eval_records: int = 300,
    steps: int = 1500,
    fit_steps: int = 400,
    workers: int = 2,
    seed: int = 0,
    threads: int = 2,
    progress: bool = True,
    recipe: str | Path | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Run the quickstart into ``out_dir``; return the summary numbers it prints.

    ``seed`` draws the data (training records with ``2·seed``, evaluation records with
    ``2·seed + 1``), the teachers and the training run; seed 0 is the README's run. ``threads``
    fixes torch's CPU threads for the run: the order of a parallel reduction depends on the
    thread count, and after 1500 steps so do the figures, so the same number of threads on any
    machine gives the same summary (on the same CPU kind and library versions). The printed
    summary is also written to ``out_dir/summary.txt``, and the numbers to ``summary.json``.

    ``recipe`` (default: the shipped ``tiny-cpu``) and ``overrides`` (``--set KEY=VALUE``, applied
    last) configure every stage as they would the command it stands for; keys the quickstart sets
    itself (its paths, steps, seed) are refused with the flag to use instead.

    Raises:
        ConfigError: a broken recipe or override, before any work.
    """
    import torch

    settings = Settings(str(recipe) if recipe is not None else RECIPE, tuple(overrides or ()))

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _pipeline(
            Path(out_dir),
            settings,
            records=records,
            eval_records=eval_records,
            steps=steps,
            fit_steps=fit_steps,
            workers=workers,
            seed=seed,
            progress=progress,
        )
    finally:
        torch.set_num_threads(previous)


def _pipeline(
    out: Path,
    settings: Settings,
    *,
    records: int,
    eval_records: int,
    steps: int,
    fit_steps: int,
    workers: int,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    """The stages in order (each prints the command a user would type for it)."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data, eval_data = _data(out, records, eval_records, seed)
    teachers = _teachers(out, data, fit_steps, seed)
    title = "prepare {} shards with teacher features"
    stage = "3. " + title.format("training")
    result = _prepare(settings, stage, data, out / "shards", teachers, workers, progress)
    stage = "4. " + title.format("evaluation")
    _prepare(settings, stage, eval_data, out / "eval-shards", teachers, workers, progress)
    run_dir, checkpoint = _train(settings, out, steps, seed, progress)
    index = _embed(settings, out, checkpoint, progress)
    rows = [json.loads(line) for line in eval_data.read_text().splitlines()]
    _retrieve(settings, checkpoint, index, rows)
    scores, evaluator = _evaluate(settings, out, checkpoint, eval_data)
    chat = _chat(settings, checkpoint, eval_data, rows)
    _stage(
        "10. plots",
        _python(f"from unimm.plots import loss_curves; loss_curves('{run_dir}/metrics.jsonl', 'loss.png')"),
    )
    plots = _plots(out, run_dir, checkpoint, evaluator)
    for path in plots["files"]:
        typer.echo(f"    {path}")

    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    window = max(1, len(history) // 10)
    t2i = scores.get("text_to_image", {})
    summary = {
        "records": records,
        "shards": result.shards,
        "losses": {
            key: (_mean(history[:window], key), _mean(history[-window:], key))
            for key in ("loss_gen", "loss_disc")
        },
        "checkpoint": str(checkpoint),
        "caption_exact_match": scores.get("captioning", {}).get("exact_match"),
        "caption_word_accuracy": scores.get("captioning", {}).get("word_accuracy"),
        "qa_exact_match": scores.get("qa", {}).get("exact_match"),
        "two_choice_accuracy": scores.get("two_choice", {}).get("accuracy"),
        "text_to_image_r1": t2i.get("R@1"),
        "text_to_image_chance": t2i.get("chance@1"),
        "target_learned_correlation": plots["correlation"],
        "chat": chat,
        "plots": [str(p) for p in plots["files"]],
        "seconds": round(time.perf_counter() - start, 1),
        "environment": environment(),
    }
    _print_summary(summary, window, out)
    return summary


def _data(out: Path, records: int, eval_records: int, seed: int) -> tuple[Path, Path]:
    from unimm.data.synthetic import write_synthetic

    _stage(
        f"1. synthetic interleaved data: {records} training and {eval_records} evaluation records",
        _python(
            "from unimm.data.synthetic import write_synthetic; "
            f"write_synthetic('{out}/train', {records}, seed={2 * seed}); "
            f"write_synthetic('{out}/eval', {eval_records}, seed={2 * seed + 1})"
        ),
    )
    data = write_synthetic(out / "train", records, seed=2 * seed)
    eval_data = write_synthetic(out / "eval", eval_records, seed=2 * seed + 1)
    typer.echo(f"    {data}\n    {eval_data}")
    return data, eval_data


def _teachers(out: Path, data: Path, fit_steps: int, seed: int) -> dict[str, Path]:
    from unimm.data.synthetic import caption_pairs
    from unimm.tiny import save_tiny_teachers

    _stage(
        "2. tiny teacher encoders: random DINOv2 and BERT experts, a CLIP fitted on the training captions",
        _python(
            "from unimm.tiny import save_tiny_teachers; "
            "from unimm.data.synthetic import caption_pairs; "
            f"save_tiny_teachers('{out}/teachers', fit_pairs=caption_pairs('{data}'), seed={seed})"
        ),
    )
    return save_tiny_teachers(out / "teachers", fit_pairs=caption_pairs(data), fit_steps=fit_steps, seed=seed)


def _train(settings: Settings, out: Path, steps: int, seed: int, progress: bool) -> tuple[Path, Path]:
    from unimm.commands.train import run as train
    from unimm.config import TrainConfig

    run_dir = out / "run"
    overrides = (
        f"data.train={out / 'shards'}",
        f"train.max_steps={steps}",
        f"train.save_every={steps}",
        f"train.seed={seed}",
    )
    args = ["unimm", "train", *settings.flags(TrainConfig, overrides), "--out", str(run_dir)]
    _stage(f"5. train the tiny model ({steps} steps, L = L_g + alpha * L_d)", args)
    shutil.rmtree(run_dir, ignore_errors=True)
    train(settings.build(TrainConfig, {"out": str(run_dir)}, overrides), progress=progress)
    return run_dir, run_dir / f"step-{steps:06d}"


def _embed(settings: Settings, out: Path, checkpoint: Path, progress: bool) -> Path:
    from unimm.commands.embed import run as embed
    from unimm.config import EmbedConfig

    index, shards = out / "index", out / "eval-shards"
    flags = settings.flags(EmbedConfig)
    _stage(
        "6. embed the evaluation documents",
        ["unimm", "embed", "--model", str(checkpoint), "--data", str(shards), "--out", str(index), *flags],
    )
    shutil.rmtree(index, ignore_errors=True)
    options = {"embed.model": str(checkpoint), "embed.data": [str(shards)], "embed.out": str(index)}
    embed(settings.build(EmbedConfig, options), progress=progress)
    return index


def _retrieve(settings: Settings, checkpoint: Path, index: Path, rows: list[dict]) -> None:
    from unimm.commands.retrieve import run as retrieve
    from unimm.config import RetrieveConfig

    captions = {r["id"]: r["meta"].get("caption", "") for r in rows}
    query = next(r["meta"]["caption"] for r in rows if r["meta"]["kind"] == "caption")
    _stage(
        "7. retrieve documents for a caption",
        [
            "unimm",
            "retrieve",
            "--model",
            str(checkpoint),
            "--index",
            str(index),
            "--query",
            query,
            "--top-k",
            "3",
            *settings.flags(RetrieveConfig),
        ],
    )
    options = {
        "retrieve.model": str(checkpoint),
        "retrieve.index": str(index),
        "retrieve.query": [["text", query]],
        "retrieve.top_k": 3,
    }
    found = retrieve(settings.build(RetrieveConfig, options))["results"][0]
    for doc, score in zip(found["ids"], found["scores"], strict=True):
        typer.echo(f"    {score:6.3f}  {doc:<14} {captions.get(doc) or '(a story)'}")


def _evaluate(settings: Settings, out: Path, checkpoint: Path, eval_data: Path):
    from unimm.commands.eval import run as evaluate
    from unimm.config import EvalConfig
    from unimm.inference.evaluate import Evaluator, format_table

    eval_json = out / "eval.json"
    flags = settings.flags(EvalConfig)
    _stage(
        "8. evaluate (generation, two-choice, retrieval, Winoground-style pairs)",
        [
            "unimm",
            "eval",
            "--model",
            str(checkpoint),
            "--data",
            str(eval_data),
            "--out",
            str(eval_json),
            *flags,
        ],
    )
    options = {"eval.model": str(checkpoint), "eval.data": [str(eval_data)], "eval.out": str(eval_json)}
    cfg = settings.build(EvalConfig, options)
    evaluator = Evaluator.load(  # shared with the plots
        checkpoint, cfg.eval.device, batch_size=cfg.eval.batch_size, dtype=cfg.eval.model_dtype
    )
    scores = evaluate(cfg, progress=False, evaluator=evaluator)
    typer.echo("    " + format_table(scores).replace("\n", "\n    "))
    return scores, evaluator


def _chat(settings: Settings, checkpoint: Path, eval_data: Path, rows: list[dict]) -> dict[str, Any]:
    from unimm.config import ChatConfig
    from unimm.inference.chat import one_shot

    question = next(r for r in rows if r["meta"]["kind"] == "qa")
    image = eval_data.parent / question["slices"][0]["image"]
    prompt = question["slices"][1]["text"]
    flags = settings.flags(ChatConfig, ("chat.max_new_tokens=8",))
    _stage(
        "9. chat once about an image",
        ["unimm", "chat", "--model", str(checkpoint), "--image", str(image), "--prompt", prompt, *flags],
    )
    options = {"chat.model": str(checkpoint), "chat.prompt": prompt, "chat.images": [str(image)]}
    answer = one_shot(settings.build(ChatConfig, options, ("chat.max_new_tokens=8",)).chat, io.StringIO())
    typer.echo(f"    USER: <image> {prompt}\n    ASSISTANT: {answer}")
    typer.echo(f"    (the image shows {question['meta']['caption']})")
    return {"question": prompt, "answer": answer, "gold": question["response"]}


def _plots(out: Path, run_dir: Path, checkpoint: Path, ev) -> dict[str, Any]:
    """Loss curves, and target vs learned similarity over the views of 12 evaluation documents."""
    from unimm.config import AlignOptions
    from unimm.data.shards import read_samples
    from unimm.model.checkpoint import read_meta
    from unimm.plots import loss_curves, off_diagonal_correlation, similarity_heatmap

    files = [loss_curves(run_dir / "metrics.jsonl", out / "loss.png")]
    samples = []
    for sample in read_samples(out / "eval-shards", split_by_node=False, split_by_worker=False):
        if (sample.meta or {}).get("kind") in ("caption", "story"):
            samples.append(sample)
            if len(samples) == 12:
                break
    known = {f.name for f in dataclasses.fields(AlignOptions)}  # a recipe may hold retired keys
    align = AlignOptions(**{k: v for k, v in read_meta(checkpoint)["recipe"]["align"].items() if k in known})
    targets, learned, same, labels = ev.view_similarities(samples, align)
    files.append(similarity_heatmap(targets, learned, out / "similarity.png", labels))
    return {"files": files, "correlation": round(off_diagonal_correlation(targets, learned, ~same), 3)}


def summary_lines(summary: dict[str, Any], window: int) -> list[str]:
    """The summary as the quickstart prints it (and as the README shows it), one line a figure."""

    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = ["summary"]
    for key, (first, last) in summary["losses"].items():
        lines.append(f"    {key:<26}: {first} -> {last} (mean of the first and last {window} steps)")
    lines += [
        f"    {'caption accuracy':<26}: {number(summary['caption_exact_match'])} exact, "
        f"{number(summary['caption_word_accuracy'])} of the words",
        f"    {'QA exact match':<26}: {number(summary['qa_exact_match'])}",
        f"    {'two-choice accuracy':<26}: {number(summary['two_choice_accuracy'])} (chance 0.5)",
        f"    {'text→image R@1':<26}: {number(summary['text_to_image_r1'])} "
        f"(chance {number(summary['text_to_image_chance'])})",
        f"    {'target–learned similarity':<26}: correlation {summary['target_learned_correlation']} "
        "(views of different documents)",
        f"    {'checkpoint':<26}: {summary['checkpoint']}",
        f"    {'plots':<26}: {', '.join(summary['plots'])}",
        f"    {'time':<26}: {summary['seconds']} s",
    ]
    return lines


def _print_summary(summary: dict[str, Any], window: int, out: Path) -> None:
    lines = summary_lines(summary, window)
    typer.secho("\n" + lines[0], bold=True)
    typer.echo("\n".join(lines[1:]))
    atomic_write_bytes(out / "summary.txt", ("\n".join(lines) + "\n").encode())
    atomic_write_json(out / "summary.json", summary)
