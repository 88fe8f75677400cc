"""``unimm mine``: the command-line face of :mod:`unimm.inference.mining`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from unimm.cli.options import (
    InstructionOpt,
    ModelDtypeOpt,
    RecipeOpt,
    SetOpt,
    as_options,
    default,
    user_errors,
)


@user_errors
def mine(
    model: Annotated[Path | None, typer.Option("--model", help="Checkpoint folder (RUN/step-…).")] = None,
    index: Annotated[
        Path | None,
        typer.Option(
            "--index", help="Index of the corpus (`unimm embed` of its record files, same --model)."
        ),
    ] = None,
    pairs: Annotated[
        Path | None,
        typer.Option(
            "--pairs", help="Pair records (unimm pairs, MMEB's layout, query/positive CSV/TSV/Parquet)."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="The pair records with mined negatives (JSONL).")
    ] = None,
    negatives: Annotated[
        int | None, typer.Option(help=f"Hard negatives per query. {default('mine.negatives')}")
    ] = None,
    depth: Annotated[
        int | None, typer.Option(help=f"Candidates searched per query. {default('mine.depth')}")
    ] = None,
    margin: Annotated[
        float | None,
        typer.Option(
            help="Drop candidates scoring above margin × the positive's score (likely false negatives). "
            + default("mine.margin")
        ),
    ] = None,
    no_filter: Annotated[
        bool, typer.Option("--no-filter", help="Keep likely false negatives (naive top-k mining).")
    ] = False,
    replace_negatives: Annotated[
        bool,
        typer.Option("--replace-negatives", help="Drop the records' own negatives (default: keep them)."),
    ] = False,
    format: Annotated[
        str | None,
        typer.Option("--format", help=f"auto | unimm | csv | mmeb | parquet {default('mine.format')}"),
    ] = None,
    image_root: Annotated[
        Path | None,
        typer.Option(help="Folder of the pairs' (and the corpus's) images \\[default: the pairs' folder]."),
    ] = None,
    backend: Annotated[str | None, typer.Option(help=f"auto | exact | ann {default('mine.backend')}")] = None,
    device: Annotated[str | None, typer.Option(help=f"auto | cpu | cuda {default('mine.device')}")] = None,
    model_dtype: ModelDtypeOpt = None,
    instruction: InstructionOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Go on after an interrupted run.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
) -> None:
    """Mine hard negatives for pair records with a checkpoint and an index of the corpus."""
    # Long only because it declares the command's options; the mapping is by name.
    given = {
        k: v
        for k, v in locals().items()
        if k not in ("quiet", "recipe", "set_", "replace_negatives", "no_filter")
    }
    from unimm.config import MineConfig, build_config
    from unimm.inference.mining import mine as run

    cfg = build_config(MineConfig, recipe=recipe, options=as_options("mine", given), overrides=set_)
    if replace_negatives:  # a flag left off is "not given" (the recipe's value stands)
        cfg.mine.keep_negatives = False
    if no_filter:
        cfg.mine.filter_false_negatives = False
    summary = run(cfg.mine, progress=not quiet)
    typer.echo(
        f"mined {summary['negatives']} negatives for {summary['records']} records into {summary['out']} "
        f"({summary['dropped_false_negatives']} likely false negatives dropped; {summary['short']} records "
        "got fewer than asked)"
    )
    root = Path(cfg.mine.image_root or Path(cfg.mine.pairs).parent)
    if Path(summary["out"]).resolve().parent != root.resolve():
        typer.echo(f"prepare it with --image-root {root} (its image paths are relative to that folder)")
