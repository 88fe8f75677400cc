"""``unimm quickstart``: the whole pipeline on a synthetic dataset, offline, on a CPU.

    unimm quickstart --out unimm-quickstart

Stages so far: draw a synthetic interleaved dataset, write tiny teacher encoders, prepare
shards with teacher features, read them back and summarise. Training, embedding, retrieval
and chat join as those commands land. Each stage prints the equivalent ``unimm`` command.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import typer

from unimm.config import PrepareConfig, build_config


def _stage(title: str, command: str | None = None) -> None:
    typer.secho(f"\n==> {title}", fg=typer.colors.CYAN, bold=True)
    if command:
        typer.echo(f"    $ {command}")


def run(
    out_dir: str | Path = "unimm-quickstart", *, records: int = 200, workers: int = 1, progress: bool = True
) -> dict:
    """Run the quickstart into ``out_dir``; return the summary numbers it prints."""
    from unimm import prepare
    from unimm.data.shards import ReadStats, read_manifest, read_samples
    from unimm.data.synthetic import write_synthetic
    from unimm.model.tiny import save_tiny_teachers

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
        "--image-size",
        "32",
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
        options={
            "prepare.inputs": [str(data)],
            "prepare.out": str(shards),
            "prepare.image_size": 32,
            "prepare.workers": workers,
            "prepare.overwrite": True,
            "teachers.image_expert": str(teachers["image_expert"]),
            "teachers.text_expert": str(teachers["text_expert"]),
            "teachers.clip": str(teachers["clip"]),
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
    summary = {
        "records": records,
        "samples": stats.samples,
        "skipped": stats.skipped,
        "shards": result.shards,
        "slices": slices,
        "kinds": kinds,
        "teacher_dims": {"u": manifest["teachers"]["u_dim"], "v": manifest["teachers"]["v_dim"]},
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
    typer.echo(f"    time              : {summary['seconds']} s")
    typer.echo("\n    Training, embedding, retrieval and chat join this quickstart as those commands land.")
    return summary
