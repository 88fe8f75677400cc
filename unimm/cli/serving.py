"""``unimm index`` (the persistent ANN index of an index) and ``unimm serve`` (the HTTP API)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from unimm.cli.options import (
    CollectionOpt,
    DbOpt,
    FilterOpt,
    InstructionOpt,
    ModelDtypeOpt,
    QuietOpt,
    RecipeOpt,
    SetOpt,
    as_options,
    default,
    user_errors,
)

index_app = typer.Typer(
    help="Persistent ANN indexes (FAISS) beside an index's embeddings.", no_args_is_help=True
)


@index_app.command("push")
@user_errors
def index_push(
    index: Annotated[
        Path | None, typer.Option("--index", help="Index folder (made by `unimm embed`).")
    ] = None,
    db: Annotated[
        str | None,
        typer.Option("--db", help="Qdrant URL (http://host:6333), or a folder for an embedded one."),
    ] = None,
    collection: Annotated[
        str | None, typer.Option("--collection", help="Collection (created if new).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help=f"Documents per upsert {default('push.batch_size')}")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip batches already pushed.")] = False,
    quiet: QuietOpt = False,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
) -> None:
    """Push an index (vectors, ids, text, metadata) into a vector database: idempotent, resumable."""
    given = {k: v for k, v in locals().items() if k not in ("quiet", "recipe", "set_")}
    from unimm.config import PushConfig, build_config
    from unimm.inference.store import read_manifest
    from unimm.inference.vectordb import push
    from unimm.utils import progress_bar

    cfg = build_config(PushConfig, recipe=recipe, options=as_options("push", given), overrides=set_)
    opts = cfg.push
    total = read_manifest(Path(opts.index))["count"]
    with progress_bar(desc="push", unit="doc", total=total, disable=quiet) as bar:
        result = push(
            opts.index,
            opts.db,
            opts.collection,
            batch_size=opts.batch_size,
            resume=opts.resume,
            progress=bar.update,
        )
    if not quiet:
        typer.echo(
            f"pushed {result['pushed']} document(s) ({result['skipped']} already there) to "
            f"{opts.collection}: {result['count']} in all"
        )


@index_app.command("build")
@user_errors
def index_build(
    index: Annotated[
        Path | None, typer.Option("--index", help="Index folder (made by `unimm embed`).")
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(help=f"faiss-flat | faiss-hnsw | faiss-ivfpq {default('index.backend')}"),
    ] = None,
    hnsw_m: Annotated[int | None, typer.Option(help=f"HNSW links per node {default('index.hnsw_m')}")] = None,
    ef_search: Annotated[
        int | None, typer.Option(help=f"HNSW search breadth {default('index.ef_search')}")
    ] = None,
    nlist: Annotated[int | None, typer.Option(help="IVF-PQ lists \\[default: 4·√n].")] = None,
    pq_m: Annotated[int | None, typer.Option(help="IVF-PQ bytes per vector \\[default: d/4].")] = None,
    nprobe: Annotated[
        int | None, typer.Option(help=f"IVF-PQ lists searched {default('index.nprobe')}")
    ] = None,
    rerank: Annotated[
        int | None,
        typer.Option(help=f"IVF-PQ: re-score rerank·k candidates exactly (0: off) {default('index.rerank')}"),
    ] = None,
    resume: Annotated[
        bool | None,
        typer.Option(
            "--resume", help="Go on with an interrupted build (saved every index.checkpoint_every vectors)."
        ),
    ] = None,
    quiet: QuietOpt = False,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
) -> None:
    """Build a FAISS index beside the embeddings; retrieve, chat and serve then search it."""
    given = {k: v for k, v in locals().items() if k not in ("quiet", "recipe", "set_")}
    from unimm.config import IndexConfig, build_config
    from unimm.inference.ann_build import build_ann

    cfg = build_config(IndexConfig, recipe=recipe, options=as_options("index", given), overrides=set_)
    ann = build_ann(cfg.index, progress=not quiet)
    params = ", ".join(f"{k}={v}" for k, v in ann["params"].items())
    if not quiet:
        typer.echo(
            f"built {ann['backend']} over {ann['count']} vectors ({params}): {ann['bytes'] / 2**20:.1f} MiB, "
            f"{ann['bytes_per_vector']:g} bytes/vector, in {Path(cfg.index.index) / 'ann'}"
        )


@user_errors
def serve(
    model: Annotated[Path | None, typer.Option("--model", help="Checkpoint folder (RUN/step-…).")] = None,
    index: Annotated[
        Path | None, typer.Option("--index", help="Index to search and to ground chat answers on.")
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(help=f"auto (the saved ANN index if any) | exact | ann {default('serve.backend')}"),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help=f"Address; 0.0.0.0 opens it to the network {default('serve.host')}")
    ] = None,
    port: Annotated[int | None, typer.Option(help=default("serve.port"))] = None,
    name: Annotated[str | None, typer.Option(help="Model id clients use \\[default: run/step].")] = None,
    max_batch: Annotated[
        int | None, typer.Option(help=f"Embedding inputs per forward pass {default('serve.max_batch')}")
    ] = None,
    device: Annotated[str | None, typer.Option(help=f"auto | cpu | cuda {default('serve.device')}")] = None,
    db: DbOpt = None,
    collection: CollectionOpt = None,
    filter: FilterOpt = None,
    allow_remote_images: Annotated[
        bool | None,
        typer.Option(
            "--allow-remote-images/--no-remote-images",
            help=f"Fetch http(s) image URLs in requests {default('serve.allow_remote_images')}",
        ),
    ] = None,
    access_log: Annotated[
        bool | None,
        typer.Option(
            "--access-log/--no-access-log", help=f"A line per request {default('serve.access_log')}"
        ),
    ] = None,
    model_dtype: ModelDtypeOpt = None,
    instruction: InstructionOpt = None,
    quiet: QuietOpt = False,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API: embeddings, chat (streaming, RAG), search.

    Set UNIMM_API_KEY to require `Authorization: Bearer KEY`. OpenAPI at /docs, Prometheus
    metrics at /metrics.
    """
    given = {k: v for k, v in locals().items() if k not in ("quiet", "recipe", "set_")}
    from unimm.commands.serve import run
    from unimm.config import ServeConfig, build_config

    if quiet:
        given["access_log"] = False if access_log is None else access_log
    cfg = build_config(ServeConfig, recipe=recipe, options=as_options("serve", given), overrides=set_)
    run(cfg, announce=(lambda _: None) if quiet else typer.echo)


@user_errors
def export(
    model: Annotated[Path | None, typer.Option("--model", help="Checkpoint folder (RUN/step-…).")] = None,
    format: Annotated[
        str | None,
        typer.Option("--format", help=f"sentence-transformers | hf-merged {default('export.format')}"),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder.")] = None,
    model_dtype: ModelDtypeOpt = None,
    instruction: InstructionOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier export.")] = False,
    quiet: QuietOpt = False,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
) -> None:
    """Export a checkpoint for other tools: sentence-transformers, or merged weights for vLLM & co."""
    given = {k: v for k, v in locals().items() if k not in ("quiet", "recipe", "set_")}
    from unimm.config import ExportConfig, build_config
    from unimm.inference.export import export as run

    cfg = build_config(ExportConfig, recipe=recipe, options=as_options("export", given), overrides=set_)
    manifest = run(cfg.export)
    if not quiet:
        typer.echo(
            f"exported {cfg.export.model} as {manifest['format']} to {cfg.export.out} (see its README.md)"
        )
