"""``unimm quickstart``: the whole pipeline on a synthetic dataset, offline, on a CPU.

    unimm quickstart --out unimm-quickstart

Stages so far: draw a synthetic interleaved dataset, write tiny teacher encoders, prepare
shards with teacher features, read them back, train the tiny model (``recipes/tiny-cpu.yaml``)
and summarise. Embedding, retrieval and chat join as those commands land. Each stage prints the
equivalent ``unimm`` command.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from pathlib import Path

import typer

from unimm.config import PrepareConfig, build_config

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.yaml"


def _stage(title: str, command: str | None = None) -> None:
    typer.secho(f"\n==> {title}", fg=typer.colors.CYAN, bold=True)
    if command:
        typer.echo(f"    $ {command}")


def run(
    out_dir: str | Path = "unimm-quickstart",
    *,
    records: int = 200,
    workers: int = 1,
    steps: int = 150,
    progress: bool = True,
) -> dict:
    """Run the quickstart into ``out_dir``; return the summary numbers it prints."""
    from unimm import prepare
    from unimm.data.shards import ReadStats, read_manifest, read_samples
    from unimm.data.synthetic import write_synthetic
    from unimm.model.tiny import save_tiny_teachers
    from unimm.train import TrainConfig
    from unimm.train import run as train

    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    _stage(
        f"1. synthetic interleaved dataset ({records} records)",
        f'python -c "from unimm.data.synthetic import write_synthetic; '
        f"write_synthetic('{out}/data', {records})\"",
    )
    data = write_synthetic(out / "data", records)
    typer.echo(f"    {data}")

    _stage(
        "2. tiny teacher encoders (random DINOv2, BERT, CLIP)",
        f'python -c "from unimm.model.tiny import save_tiny_teachers; '
        f"save_tiny_teachers('{out}/teachers')\"",
    )
    teachers = save_tiny_teachers(out / "teachers")

    shards = out / "shards"
    args = [
        "unimm",
        "prepare",
        str(data),
        "--out",
        str(shards),
        "--recipe",
        str(RECIPE),
        "--workers",
        str(workers),
        "--teacher-image-expert",
        str(teachers["image_expert"]),
        "--teacher-text-expert",
        str(teachers["text_expert"]),
        "--teacher-clip",
        str(teachers["clip"]),
        "--overwrite",
    ]
    _stage("3. prepare shards with teacher features", shlex.join(args))
    cfg = build_config(
        PrepareConfig,
        recipe=RECIPE,
        options={
            "prepare.inputs": [str(data)],
            "prepare.out": str(shards),
            "prepare.workers": workers,
            "prepare.overwrite": True,
            **{f"teachers.{k}": str(v) for k, v in teachers.items()},
        },
    )
    result = prepare.run(cfg, progress=progress)

    _stage("4. read the shards back")
    stats = ReadStats()
    kinds: dict[str, int] = {}
    slices = 0
    for sample in read_samples(shards, split_by_node=False, split_by_worker=False, stats=stats):
        kind = (sample["meta"] or {}).get("kind", "?")
        kinds[kind] = kinds.get(kind, 0) + 1
        slices += len(sample["slices"])
    manifest = read_manifest(shards)

    run_dir = out / "run"
    overrides = [f"data.train={shards}", f"train.max_steps={steps}", f"train.save_every={steps}"]
    train_args = ["unimm", "train", "--recipe", str(RECIPE)]
    for item in overrides:
        train_args += ["--set", item]
    _stage(
        f"5. train the tiny model ({steps} steps, L = L_g + alpha * L_d)",
        shlex.join([*train_args, "--out", str(run_dir)]),
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    train(
        build_config(TrainConfig, recipe=RECIPE, options={"out": str(run_dir)}, overrides=overrides),
        progress=progress,
    )
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    window = max(1, len(history) // 10)

    def mean(rows: list[dict], key: str) -> float:
        return round(sum(r[key] for r in rows) / len(rows), 3)

    losses = {
        key: (mean(history[:window], key), mean(history[-window:], key)) for key in ("loss_gen", "loss_disc")
    }
    summary = {
        "records": records,
        "samples": stats.samples,
        "skipped": stats.skipped,
        "shards": result.shards,
        "slices": slices,
        "kinds": kinds,
        "teacher_dims": {"u": manifest["teachers"]["u_dim"], "v": manifest["teachers"]["v_dim"]},
        "losses": losses,
        "checkpoint": str(run_dir / f"step-{steps:06d}"),
        "seconds": round(time.perf_counter() - start, 1),
    }
    typer.secho("\nsummary", bold=True)
    typer.echo(f"    samples read back : {stats.samples} of {records} ({stats.skipped} skipped)")
    typer.echo(f"    kinds             : {', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}")
    typer.echo(
        f"    slices            : {slices} (teacher features u: {summary['teacher_dims']['u']}-d, "
        f"v: {summary['teacher_dims']['v']}-d per slice)"
    )
    typer.echo(f"    shards            : {result.shards} in {shards} (manifest.json lists their sha256)")
    for key, (first, last) in losses.items():
        typer.echo(f"    {key:<18}: {first} -> {last} (mean of the first and last {window} steps)")
    typer.echo(f"    checkpoint        : {summary['checkpoint']}")
    typer.echo(f"    time              : {summary['seconds']} s")
    typer.echo("\n    Embedding, retrieval and chat join this quickstart as those commands land.")
    return summary
