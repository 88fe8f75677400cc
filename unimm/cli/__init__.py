"""The ``unimm`` command line: each subcommand turns its options into a config and calls ``run``.

    unimm --help
    unimm prepare data.jsonl --out shards/ --image-size 336 --workers 2
    unimm bench prepare

A CLI option left out means "not given": it does not override the recipe (``--recipe``), and
``--set a.b=value`` overrides both. User mistakes print one clear message (exit code 2), never
a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from unimm import __version__
from unimm.cli.config_show import config_app
from unimm.cli.eval_bench import bench_app, eval_app
from unimm.cli.mining import mine
from unimm.cli.options import (
    CollectionOpt,
    ColumnsOpt,
    DbOpt,
    FilterOpt,
    InstructionOpt,
    ModelDtypeOpt,
    RecipeOpt,
    SetOpt,
    as_options,
    default,
    user_errors,
)
from unimm.cli.serving import export, index_app, serve

app = typer.Typer(
    name="unimm",
    help="Train and serve one multimodal LLM that both generates and retrieves.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(eval_app, name="eval", rich_help_panel="Model")
app.add_typer(bench_app, name="bench")
app.add_typer(index_app, name="index", rich_help_panel="Model")
app.add_typer(config_app, name="config", rich_help_panel="Start here")
app.command(rich_help_panel="Model")(serve)
app.command(rich_help_panel="Model")(export)
app.command(rich_help_panel="Data")(mine)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"unimm {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Train and serve one multimodal LLM that both generates and retrieves."""


@app.command(rich_help_panel="Data")
@user_errors
def prepare(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Record files: unimm JSONL (records or pairs), LLaVA JSON/JSONL, MMC4 JSONL, CSV/TSV, "
            "MMEB's layout, Parquet (image–text or pairs); or folders: a datasets save_to_disk folder, "
            "an imagefolder with metadata.jsonl."
        ),
    ],
    out: Annotated[Path | None, typer.Option("--out", help="Output shard directory.")] = None,
    format: Annotated[
        str | None,
        typer.Option(
            "--format", help=f"auto | unimm | llava | mmc4 | csv | mmeb | parquet {default('prepare.format')}"
        ),
    ] = None,
    image_root: Annotated[
        Path | None,
        typer.Option(
            help="Folder image paths are relative to and must stay in \\[default: the input's folder]."
        ),
    ] = None,
    columns: ColumnsOpt = None,
    samples_per_shard: Annotated[int | None, typer.Option(help=default("prepare.samples_per_shard"))] = None,
    max_shard_bytes: Annotated[int | None, typer.Option(help=default("prepare.max_shard_bytes"))] = None,
    image_size: Annotated[
        int | None,
        typer.Option(help="Resize so the shorter side is this (never upscales) \\[default: keep]."),
    ] = None,
    jpeg_quality: Annotated[int | None, typer.Option(help=default("prepare.jpeg_quality"))] = None,
    workers: Annotated[
        int | None, typer.Option(help=f"Image processes {default('prepare.workers')}.")
    ] = None,
    on_error: Annotated[
        str | None,
        typer.Option(
            help=f"fail | skip (bad records listed in DIR/rejects.jsonl) {default('prepare.on_error')}"
        ),
    ] = None,
    verify_images: Annotated[
        str | None,
        typer.Option(help=f"full (decode every image) | header (faster) {default('prepare.verify_images')}"),
    ] = None,
    max_image_pixels: Annotated[
        int | None, typer.Option(help="Decompression-bomb limit \\[default: Pillow's].")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Keep intact shards of an interrupted run.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing prepared directory.")
    ] = False,
    teacher_image_expert: Annotated[
        Path | None,
        typer.Option(help="Local image-expert model folder (e.g. DINOv2).", rich_help_panel="Teachers"),
    ] = None,
    teacher_text_expert: Annotated[
        Path | None,
        typer.Option(help="Local text-expert model folder (e.g. BGE).", rich_help_panel="Teachers"),
    ] = None,
    teacher_clip: Annotated[
        Path | None, typer.Option(help="Local CLIPModel folder.", rich_help_panel="Teachers")
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(help=f"Teacher device {default('teachers.device')}.", rich_help_panel="Teachers"),
    ] = None,
    teacher_batch_size: Annotated[
        int | None, typer.Option(help=default("teachers.batch_size"), rich_help_panel="Teachers")
    ] = None,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust-remote-code",
            help="Run model code shipped in teacher folders.",
            rich_help_panel="Teachers",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
) -> None:
    """Turn records into WebDataset shards (+ frozen teacher features for the structure-induced loss)."""
    # Long only because it declares the command's 19 options; the mapping is by name.
    given = {k: v for k, v in locals().items() if k not in ("quiet", "recipe", "set_")}
    from unimm.commands.prepare import run, teachers_warning
    from unimm.config import PrepareConfig, build_config

    teacher_keys = ("image_expert", "text_expert", "clip", "batch_size")
    renames = {f"teacher_{k}": f"teachers.{k}" for k in teacher_keys}
    renames |= {"device": "teachers.device", "trust_remote_code": "teachers.trust_remote_code"}
    cfg = build_config(
        PrepareConfig, recipe=recipe, options=as_options("prepare", given, renames), overrides=set_
    )
    if warning := teachers_warning(cfg, recipe):
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    result = run(cfg, progress=not quiet)
    kept = f" ({result.kept_shards} kept from the earlier run)" if result.kept_shards else ""
    typer.echo(
        f"wrote {result.samples} sample(s) in {result.shards} shard(s){kept} to {result.out_dir} "
        f"in {result.seconds:.1f} s"
    )
    if result.rejects:
        typer.secho(
            f"{result.rejects} record(s) left out; see {result.out_dir / 'rejects.jsonl'}",
            fg=typer.colors.YELLOW,
            err=True,
        )


@app.command(rich_help_panel="Start here")
@user_errors
def quickstart(
    out: Annotated[Path, typer.Option("--out", help="Working folder (data, teachers, shards).")] = Path(
        "unimm-quickstart"
    ),
    records: Annotated[int, typer.Option(help="Synthetic training records to draw.", min=10)] = 1000,
    eval_records: Annotated[int, typer.Option(help="Synthetic evaluation records.", min=10)] = 300,
    workers: Annotated[int, typer.Option(help="Image processes.", min=1)] = 2,
    steps: Annotated[int, typer.Option(help="Training steps.", min=1)] = 1500,
    seed: Annotated[int, typer.Option(help="Seed of the data, the teachers and training.", min=0)] = 0,
    threads: Annotated[
        int, typer.Option(help="CPU threads for torch (the figures depend on it; the README's: 2).", min=1)
    ] = 2,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars (the stages still print).")
    ] = False,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run the pipeline end to end on a synthetic dataset: offline, CPU only, a few minutes.

    --recipe (default: tiny-cpu) and --set configure each stage as they would its command.
    On x86-64 it runs torch's AVX2 code paths (as the README's figures did) unless
    ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS or ONEDNN_MAX_CPU_ISA say otherwise.
    """
    from unimm.pipelines.quickstart import pin_cpu_code_paths, run

    if "ATEN_CPU_CAPABILITY" in pin_cpu_code_paths():
        import torch

        if torch.backends.cpu.get_cpu_capability() != "AVX2":
            typer.secho(
                f"this CPU runs torch's {torch.backends.cpu.get_cpu_capability()} code paths, not the "
                "AVX2 ones the README's figures came from: expect figures within the README's bands",
                fg=typer.colors.YELLOW,
                err=True,
            )
    run(
        out,
        records=records,
        eval_records=eval_records,
        workers=workers,
        steps=steps,
        seed=seed,
        threads=threads,
        progress=not quiet,
        recipe=recipe,
        overrides=set_,
    )


@app.command(rich_help_panel="Start here")
@user_errors
def recipes(
    name: Annotated[
        str | None, typer.Argument(help="A shipped recipe's name (e.g. tiny-cpu, accelerate/ddp): print it.")
    ] = None,
    path: Annotated[
        bool, typer.Option("--path", help="Print only the recipe's file path (for accelerate --config_file).")
    ] = False,
) -> None:
    """List the shipped recipes, or print one: its file with where it lives (``> mine.yaml`` to copy it)."""
    from unimm.config import SHIPPED_RECIPES, recipe_description, resolve_recipe, shipped_recipes

    if name is None:
        if path:
            typer.echo(SHIPPED_RECIPES)
            return
        typer.echo(f"recipes shipped with unimm ({SHIPPED_RECIPES}); `unimm recipes NAME` prints one:")
        for recipe, file in shipped_recipes().items():
            typer.echo(f"  {recipe:<22} {recipe_description(file)}")
        return
    file = resolve_recipe(name, flag="unimm recipes")
    if path:
        typer.echo(file)
        return
    # A comment first, so that the output stays a valid recipe of its own.
    typer.echo(f"# {file}\n{file.read_text()}", nl=False)


@app.command(rich_help_panel="Model")
@user_errors
def train(
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run directory (metrics.jsonl, step-* checkpoints).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out.")
    ] = False,
    merge_lora: Annotated[
        bool, typer.Option("--merge-lora", help="Also save LoRA merged into the weights.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train one model to generate and embed: L = L_g + alpha * L_d (structure-induced)."""
    from unimm.commands.train import notes, run
    from unimm.config import TrainConfig, build_config

    cfg = build_config(
        TrainConfig,
        recipe=recipe,
        options={
            "out": None if out is None else str(out),
            "resume": resume or None,
            "train.merge_lora": merge_lora or None,
        },
        overrides=set_,
    )
    result = run(cfg, progress=not quiet)
    if not result.get("main", True):
        return
    typer.echo(
        f"trained to step {result.get('step')} (loss {result.get('loss', float('nan')):.4f}, "
        f"gen {result.get('loss_gen', float('nan')):.4f}, disc {result.get('loss_disc', float('nan')):.4f}"
        + (f", pair {result['loss_pair']:.4f}" if "loss_pair" in result else "")
        + f"); checkpoints in {cfg.out}"
    )
    said = notes(result.get("history", {}))
    if said:
        typer.echo("note: " + "; ".join(said) + " (this process)")


@app.command(rich_help_panel="Model")
@user_errors
def embed(
    model: Annotated[Path | None, typer.Option("--model", help="Checkpoint folder (RUN/step-…).")] = None,
    data: Annotated[
        list[Path] | None,
        typer.Option(
            "--data",
            help="Record file (JSONL, LLaVA JSON, MMC4, CSV/TSV, Parquet), datasets folder, imagefolder "
            "or shard directory; repeatable.",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Index directory.")] = None,
    format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help=f"Record format: auto | unimm | llava | mmc4 | csv | parquet {default('embed.format')}",
        ),
    ] = None,
    image_root: Annotated[
        Path | None,
        typer.Option(
            help="Folder record image paths are relative to and must stay in \\[default: the file's]."
        ),
    ] = None,
    columns: ColumnsOpt = None,
    on_error: Annotated[
        str | None,
        typer.Option(help=f"fail | skip (bad records, images and repeated ids) {default('embed.on_error')}"),
    ] = None,
    append: Annotated[
        bool, typer.Option("--append", help="Add the documents to the existing index in --out.")
    ] = False,
    batch_size: Annotated[int | None, typer.Option(help=default("embed.batch_size"))] = None,
    dtype: Annotated[str | None, typer.Option(help=f"float16 | float32 {default('embed.dtype')}")] = None,
    per_slice: Annotated[bool, typer.Option("--per-slice", help="Also store per-slice embeddings.")] = False,
    dim: Annotated[
        int | None, typer.Option(help="Vectors of this trained Matryoshka size (default: the full size).")
    ] = None,
    device: Annotated[str | None, typer.Option(help=f"auto | cpu | cuda {default('embed.device')}")] = None,
    model_dtype: ModelDtypeOpt = None,
    instruction: InstructionOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Keep finished parts of an earlier run.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing index.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
) -> None:
    """Embed documents (record files or prepared shards) into an index, one unit vector each."""
    # Long only because it declares the command's options; the mapping is by name.
    given = {k: v for k, v in locals().items() if k not in ("quiet", "recipe", "set_")}
    from unimm.commands.embed import run
    from unimm.config import EmbedConfig, build_config

    cfg = build_config(EmbedConfig, recipe=recipe, options=as_options("embed", given), overrides=set_)
    manifest = run(cfg, progress=not quiet)
    if not manifest.get("main", True):
        return
    shape = f"{manifest['dim']}-d, {manifest['dtype']}"
    if cfg.embed.append:
        typer.echo(
            f"added {manifest['added']} documents to {cfg.embed.out} (now {manifest['count']}, {shape})"
        )
    else:
        typer.echo(f"embedded {manifest['count']} documents ({shape}) into {cfg.embed.out}")
    if manifest["rejected_reasons"]:
        typer.secho(
            f"warning: {manifest['added_rejected']} document(s) left out (embed.on_error=skip); first: "
            f"{manifest['rejected_reasons'][0]}",
            fg=typer.colors.YELLOW,
            err=True,
        )
    expected = manifest.get("expected")
    if expected is not None and manifest["count"] < expected:  # only under embed.verify=off
        typer.secho(
            f"warning: {expected - manifest['count']} of the {expected} documents the shards' manifests "
            "list could not be read and were left out (skipped_corrupt in the index manifest)",
            fg=typer.colors.YELLOW,
            err=True,
        )


@app.command(rich_help_panel="Model")
@user_errors
def retrieve(
    model: Annotated[Path | None, typer.Option("--model", help="Checkpoint folder (RUN/step-…).")] = None,
    index: Annotated[
        Path | None, typer.Option("--index", help="Index directory (from `unimm embed`).")
    ] = None,
    query: Annotated[list[str] | None, typer.Option("--query", help="Query text; repeatable.")] = None,
    image: Annotated[list[Path] | None, typer.Option("--image", help="Query image; repeatable.")] = None,
    queries: Annotated[Path | None, typer.Option("--queries", help="A file of query records.")] = None,
    image_root: Annotated[Path | None, typer.Option(help="Folder of the query records' images.")] = None,
    top_k: Annotated[
        int | None, typer.Option("--top-k", help=f"Results per query. {default('retrieve.top_k')}")
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(help=f"auto (the saved ANN index if any) | exact | ann {default('retrieve.backend')}"),
    ] = None,
    rerank: Annotated[
        str | None,
        typer.Option(
            help=f"none | gak (needs an index embedded with --per-slice) {default('retrieve.rerank')}"
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the results as JSONL.")] = None,
    qrels: Annotated[
        Path | None, typer.Option("--qrels", help="Relevance judgements (JSONL or TREC).")
    ] = None,
    db: DbOpt = None,
    collection: CollectionOpt = None,
    filter: FilterOpt = None,
    metrics_out: Annotated[
        Path | None, typer.Option("--metrics-out", help="Write the metrics as JSON.")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help=f"auto | cpu | cuda {default('retrieve.device')}")
    ] = None,
    model_dtype: ModelDtypeOpt = None,
    instruction: InstructionOpt = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print nothing: results only in --out and --metrics-out.")
    ] = False,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
) -> None:
    """Search an index with text, image or interleaved queries (and score them against qrels)."""
    given = {k: v for k, v in locals().items() if k not in ("query", "image", "quiet", "recipe", "set_")}
    from unimm.commands.retrieve import query_order, run
    from unimm.config import RetrieveConfig, build_config

    typed = [["text", q] for q in query or []] + [["image", str(i)] for i in image or []]
    ordered = query_order(sys.argv)
    if sorted(map(tuple, ordered)) == sorted(map(tuple, typed)):
        typed = ordered  # the order typed on the command line (texts and images interleaved)
    options = as_options("retrieve", {**given, "query": typed})
    cfg = build_config(RetrieveConfig, recipe=recipe, options=options, overrides=set_)
    result = run(cfg)
    if not quiet:
        _print_results(result, out)


def _print_results(result: dict, out: Path | None) -> None:
    for item in result["results"][:20]:
        typer.secho(f"query {item['query_id']} ({result['backend']} search)", bold=True)
        for rank, (doc, score) in enumerate(zip(item["ids"], item["scores"], strict=True), start=1):
            typer.echo(f"  {rank:>3}  {score:+.4f}  {doc}")
    if len(result["results"]) > 20:
        typer.echo(f"  ... {len(result['results']) - 20} more queries" + (f" in {out}" if out else ""))
    if result["metrics"]:
        typer.secho("metrics", bold=True)
        for name, value in result["metrics"].items():
            typer.echo(f"  {name:<10} {value:.4f}" if isinstance(value, float) else f"  {name:<10} {value}")


@app.command(rich_help_panel="Model")
@user_errors
def chat(
    model: Annotated[Path | None, typer.Option("--model", help="Checkpoint folder (RUN/step-…).")] = None,
    index: Annotated[Path | None, typer.Option("--index", help="Ground answers on this index (RAG).")] = None,
    backend: Annotated[
        str | None,
        typer.Option(help=f"auto (the saved ANN index if any) | exact | ann {default('chat.backend')}"),
    ] = None,
    top_k: Annotated[
        int | None, typer.Option("--top-k", help=f"Documents retrieved per message. {default('chat.top_k')}")
    ] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="One-shot: answer this and exit.")] = None,
    image: Annotated[
        list[Path] | None, typer.Option("--image", help="One-shot: image(s) before the prompt.")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help=f"Longest answer in tokens. {default('chat.max_new_tokens')}")
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help=f"0 = greedy; > 0 samples. {default('chat.temperature')}")
    ] = None,
    top_p: Annotated[
        float | None, typer.Option(help=f"Nucleus sampling mass. {default('chat.top_p')}")
    ] = None,
    device: Annotated[str | None, typer.Option(help=f"auto | cpu | cuda {default('chat.device')}")] = None,
    db: DbOpt = None,
    collection: CollectionOpt = None,
    filter: FilterOpt = None,
    model_dtype: ModelDtypeOpt = None,
    instruction: InstructionOpt = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Answers only: no banner, no retrieved-document lines.")
    ] = False,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
) -> None:
    """Chat with a checkpoint (REPL or --prompt), optionally grounded on retrieved documents."""
    given = {k: v for k, v in locals().items() if k not in ("quiet", "recipe", "set_")}
    from unimm.commands.chat import run
    from unimm.config import ChatConfig, build_config

    renames = {"image": "chat.images"}
    cfg = build_config(ChatConfig, recipe=recipe, options=as_options("chat", given, renames), overrides=set_)
    run(cfg, quiet=quiet)


def main() -> None:
    """Console-script entry point (also ``python -m unimm.cli`` under torchrun or accelerate)."""
    try:
        app(prog_name="unimm")
    except SystemExit as done:
        if not done.code and _close_process_group():
            _exit_now()
        raise


def _close_process_group() -> bool:
    """Leave a distributed run together and tear the process group down; True if there was one.

    Only after success: tearing down while another rank is still in a collective would hang it.
    """
    if "torch" not in sys.modules:  # nothing distributed ran (e.g. --help)
        return False
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    dist.destroy_process_group()
    return True


def _exit_now() -> None:
    """End a successful distributed process without interpreter finalization.

    Finalization can still meet gloo's worker threads and abort the process ("terminate called
    without an active exception", SIGABRT; pytorch/pytorch#190489, #179291), which a launcher
    reports as a failed run although every file was written (atomically) before. Output is
    flushed and logging shut down first; nothing of ours needs the skipped atexit handlers.
    """
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
