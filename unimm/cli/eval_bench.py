"""``unimm eval`` and ``unimm bench``: scoring a checkpoint, and benchmarks against baselines."""

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
    comma_list,
    default,
    user_errors,
)
from unimm.errors import UnimmError

eval_app = typer.Typer(help="Evaluate a checkpoint; `unimm eval ablate` runs the paper's ablation.")
bench_app = typer.Typer(
    help="Benchmarks: ours against a baseline on the same data, as ratios.", no_args_is_help=True
)


def _claim_json(path: Path | None) -> Path | None:
    """``--json`` is checked before the bench runs: never over another command's output."""
    if path is not None:
        from unimm.outputs import claim_output

        try:
            claim_output(path, None, flag="--json")
        except UnimmError as exc:
            raise typer.BadParameter(str(exc).split(": ", 1)[-1]) from None
    return path


JsonOut = Annotated[
    Path | None, typer.Option("--json", help="Also write the results as JSON.", callback=_claim_json)
]


@eval_app.callback(invoke_without_command=True)
@user_errors
def eval_(
    ctx: typer.Context,
    model: Annotated[Path | None, typer.Option("--model", help="Checkpoint folder (RUN/step-…).")] = None,
    data: Annotated[
        list[Path] | None, typer.Option("--data", help="Record file or shard directory; repeatable.")
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(help="Comma list of qa, captioning, two_choice, retrieval, interleaved, winoground."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help=f"Items per task, 0 = all {default('eval.limit')}")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the results as JSON here.")] = None,
    batch_size: Annotated[int | None, typer.Option(help=default("eval.batch_size"))] = None,
    input_format: Annotated[
        str | None, typer.Option("--format", help=f"Record format {default('eval.format')}")
    ] = None,
    image_root: Annotated[Path | None, typer.Option(help="Folder image paths are relative to.")] = None,
    device: Annotated[str | None, typer.Option(help=f"auto | cpu | cuda {default('eval.device')}")] = None,
    model_dtype: ModelDtypeOpt = None,
    instruction: InstructionOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    benchmark: Annotated[
        str | None,
        typer.Option(help="A benchmark read from its official files (see --list); --data is its folder."),
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="The benchmark's split: test (published figures) or val.")
    ] = None,
    rag: Annotated[
        Path | None,
        typer.Option(help="Retrieval-augmented: an index (unimm embed) to retrieve from for each question."),
    ] = None,
    rag_k: Annotated[
        int | None, typer.Option(help=f"Documents retrieved per question {default('eval.rag_k')}")
    ] = None,
    judge: Annotated[
        str | None, typer.Option(help="Judged benchmarks: URL of an OpenAI-compatible endpoint.")
    ] = None,
    judge_model: Annotated[
        str | None, typer.Option(help=f"The judge's model {default('eval.judge_model')}")
    ] = None,
    list_: Annotated[
        bool, typer.Option("--list", help="List the benchmarks and the files each reads.")
    ] = False,
    compare: Annotated[
        tuple[Path, Path] | None,
        typer.Option(help="Print two results files (--out of earlier runs) side by side.", metavar="A B"),
    ] = None,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
) -> None:
    """Score a checkpoint: generation (exact match, two-choice) and retrieval (text↔image,
    interleaved, Winoground-style pairs) on records, or a benchmark on its own files
    (--benchmark), as a table and optionally JSON."""
    # Long only because it declares the command's options; the mapping is by name.
    if ctx.invoked_subcommand is not None:
        return
    if list_:
        from unimm.benchmarks import format_list

        typer.echo(format_list())
        return
    if compare is not None:
        typer.echo(_compare(*compare))
        return
    given = {
        k: v for k, v in locals().items() if k not in ("ctx", "recipe", "set_", "list_", "compare", "quiet")
    }
    from unimm.config import EvalConfig, build_config

    options = as_options("eval", {**given, "tasks": comma_list(tasks)}, {"input_format": "eval.format"})
    cfg = build_config(EvalConfig, recipe=recipe, options=options, overrides=set_)
    if cfg.eval.benchmark:
        from unimm.benchmarks.run import format_results
        from unimm.commands.eval import run_benchmark

        results = run_benchmark(cfg, progress=not quiet)
        for note in results["notes"]:
            typer.echo(f"note: {note}")
        typer.echo(format_results(results))
        if cfg.eval.out:
            typer.echo(f"written: {cfg.eval.out}")
        return
    from unimm.commands.eval import run
    from unimm.inference.evaluate import format_table

    typer.echo(format_table(run(cfg, progress=not quiet)))


def _compare(a: Path, b: Path) -> str:
    """Two benchmark results files side by side (``unimm eval --compare``)."""
    import json

    from unimm.benchmarks.run import format_comparison

    loaded = []
    for path in (a, b):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UnimmError(f"--compare {path}: cannot read it as JSON ({exc})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("metrics"), dict):
            raise UnimmError(f"--compare {path}: not a results file of unimm eval --benchmark (no 'metrics')")
        loaded.append(doc)
    if loaded[0].get("benchmark") != loaded[1].get("benchmark"):
        raise UnimmError(
            f"--compare: {a} is {loaded[0].get('benchmark')!r}, {b} is {loaded[1].get('benchmark')!r}; "
            "compare results of one benchmark"
        )
    header = f"A: {a} ({loaded[0].get('model')})\nB: {b} ({loaded[1].get('model')})"
    return header + "\n" + format_comparison(*loaded)


def _seeds(text: str) -> list[int]:
    try:
        return [int(v) for v in comma_list(text) or []]
    except ValueError:
        raise UnimmError(f"--seeds: give whole numbers separated by commas, got {text!r}") from None


@eval_app.command("ablate")
@user_errors
def eval_ablate(
    recipe: Annotated[
        Path, typer.Option("--recipe", help="Training recipe for every variant.", dir_okay=False)
    ],
    train: Annotated[list[Path], typer.Option("--train", help="Prepared training shards; repeatable.")],
    eval_data: Annotated[
        list[Path], typer.Option("--eval", help="Evaluation records or shards; repeatable.")
    ],
    steps: Annotated[int, typer.Option(help="Training steps per variant.", min=1)] = 1500,
    seeds: Annotated[
        str, typer.Option(help="Comma list of training seeds; each variant is trained once per seed.")
    ] = "0",
    out: Annotated[Path, typer.Option("--out", help="Folder for the runs and the table.")] = Path("ablation"),
    variants: Annotated[
        str | None,
        typer.Option(
            help="Comma list (default: the paper's rows: joint, w/o data_g, w/o data_d, w/o GAK, "
            "w/o triple kernel, w/o avg pooling; also generative-only, discriminative-only)."
        ),
    ] = None,
    reduce: Annotated[
        float, typer.Option(help="The fraction of a task's data the w/o data_g / w/o data_d rows keep.")
    ] = 0.5,
    benchmark: Annotated[
        list[str] | None,
        typer.Option(
            "--benchmark",
            help="NAME=FOLDER (or NAME@SPLIT=FOLDER): also score each variant on a benchmark; repeatable.",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    set_: SetOpt = None,
) -> None:
    """Train the paper's ablation variants on the same data, seed and steps; print the table."""
    from unimm.pipelines.ablate import PAPER_ROWS, AblateOptions, run

    benchmarks, splits = {}, {}
    for pair in benchmark or []:
        name, sep, folder = pair.partition("=")
        name, _, split = name.strip().partition("@")
        if not sep or not name or not folder.strip():
            raise UnimmError(
                f"--benchmark {pair!r}: give NAME=FOLDER or NAME@SPLIT=FOLDER (vqav2@val=data/vqa)"
            )
        benchmarks[name] = folder.strip()
        if split:
            splits[name] = split
    opts = AblateOptions(
        recipe=str(recipe),
        train=[str(t) for t in train],
        eval=[str(e) for e in eval_data],
        steps=steps,
        seeds=_seeds(seeds),
        out=str(out),
        variants=comma_list(variants) or list(PAPER_ROWS),
        overrides=list(set_ or []),
        reduce=reduce,
        benchmarks=benchmarks,
        splits=splits,
    )
    summary = run(opts, progress=not quiet)
    typer.echo("\n" + summary["table"] + "\n\n" + "\n".join(summary["verdict"]))
    typer.echo(f"\nwritten: {out}/ablation.md, ablation.json, ablation.png, loss.png")


@bench_app.command("prepare")
@user_errors
def bench_prepare_cmd(
    records: Annotated[int, typer.Option(help="Records in the synthetic set.")] = 2000,
    images_per_record: Annotated[int, typer.Option(help="Images per record.")] = 2,
    image_width: Annotated[int, typer.Option(help="Width of the synthetic JPEGs (height = 3/4).")] = 640,
    repeats: Annotated[int, typer.Option(help="Timed runs per variant (best is kept).")] = 2,
    json_out: JsonOut = None,
) -> None:
    """Samples/s of `unimm prepare` against writing the same files into a plain tar."""
    from unimm.commands.bench import bench_prepare, print_table

    rows = bench_prepare(
        records=records, images_per_record=images_per_record, image_width=image_width, repeats=repeats
    )
    print_table(rows)
    _write_json(json_out, rows)


@bench_app.command("align")
@user_errors
def bench_align_cmd(
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    quick: Annotated[
        bool, typer.Option("--quick", help="A smaller grid (on CUDA: 1024 views x 16 slices only).")
    ] = False,
    json_out: JsonOut = None,
) -> None:
    """All-pairs GAK: reference vs Triton (CUDA) and vs tslearn (CPU), as ratios."""
    from unimm.commands.bench import bench_align, print_align_table

    device = _check_device(device)
    rows = bench_align(device=device, quick=quick)
    print_align_table(rows)
    _write_json(json_out, rows)


@bench_app.command("train")
@user_errors
def bench_train_cmd(
    steps: Annotated[int, typer.Option(help="Optimizer steps per timing.")] = 20,
    batch_size: Annotated[int, typer.Option(help="Samples per step.")] = 8,
    hidden_size: Annotated[int, typer.Option(help="Language model width (64: the tiny model).")] = 64,
    layers: Annotated[int, typer.Option(help="Language model layers.")] = 2,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    mixed_precision: Annotated[str, typer.Option(help="no or bf16 (autocast).")] = "no",
    peak_tflops: Annotated[
        float | None, typer.Option(help="The device's peak TFLOP/s for the dtype, to report MFU.")
    ] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per variant (best is kept).")] = 3,
    json_out: JsonOut = None,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    family: Annotated[str, typer.Option(help="Tiny model family: llava, qwen2_vl, gemma3, ...")] = "llava",
) -> None:
    """Step time of joint training vs generative-only on the same batch; tokens/s and model FLOP/s.

    The variants train the tiny model with --recipe (default: tiny-cpu) and --set, except the keys
    that define them (train.alpha, data.train, data.cut_points, model.path, model.tiny).
    """

    from unimm.commands.bench_train import bench_train

    device = _check_device(device)
    if mixed_precision not in ("no", "bf16"):
        raise UnimmError(f"--mixed-precision {mixed_precision}: use no or bf16")
    if min(steps, batch_size, layers, repeats) < 1 or hidden_size < 16 or hidden_size % 16:
        raise UnimmError(
            "--steps, --batch-size, --layers and --repeats must be >= 1; --hidden-size a multiple of 16"
        )
    rows = bench_train(
        steps=steps,
        batch_size=batch_size,
        hidden_size=hidden_size,
        layers=layers,
        device=device,
        mixed_precision=mixed_precision,
        peak_tflops=peak_tflops,
        repeats=repeats,
        recipe=str(recipe) if recipe is not None else "tiny-cpu",
        overrides=list(set_ or ()),
        family=family,
    )
    keys = ["variant", "step_s", "ratio_vs_generative_only", "tokens_per_s", "model_tflops_per_s"]
    _echo_table(rows, keys + (["mfu"] if peak_tflops else []))
    first = rows[0]
    typer.echo(f"{first['model']}; batch {first['batch']}, {first['tokens']} tokens, {first['views']} views")
    _write_json(json_out, rows)


@bench_app.command("data")
@user_errors
def bench_data_cmd(
    batch_size: Annotated[int, typer.Option(help="Samples per batch.")] = 16,
    image_size: Annotated[int, typer.Option(help="Image side in pixels (336: LLaVA-1.5).")] = 336,
    batches: Annotated[int, typer.Option(help="Batches timed per variant.")] = 24,
    workers: Annotated[str, typer.Option(help="Worker counts to time, comma-separated.")] = "1,2,4",
    json_out: JsonOut = None,
    family: Annotated[str, typer.Option(help="Tiny model family: llava, qwen2_vl, gemma3, ...")] = "llava",
) -> None:
    """Batches/s of the training data path: worker processes and the prefetch thread vs inline."""
    from unimm.commands.bench_train import bench_data

    try:
        counts = tuple(int(n) for n in workers.split(","))
    except ValueError:
        raise UnimmError(f"--workers {workers}: give whole numbers separated by commas, e.g. 1,2,4") from None
    if any(n < 1 for n in counts) or batch_size < 1 or batches < 1 or image_size < 14:
        raise UnimmError("--workers, --batch-size and --batches must be >= 1, --image-size >= 14")
    rows = bench_data(
        batch_size=batch_size, image_size=image_size, batches=batches, workers=counts, family=family
    )
    _echo_table(rows, ["variant", "batches_per_s", "samples_per_s", "ratio"])
    typer.echo(f"{family}; batch {rows[0]['batch']}, images {rows[0]['image']}, {rows[0]['cpus']} CPUs")
    _write_json(json_out, rows)


@bench_app.command("retrieve")
@user_errors
def bench_retrieve_cmd(
    docs: Annotated[int, typer.Option(help="Index size.")] = 100_000,
    dim: Annotated[int, typer.Option(help="Embedding width.")] = 1024,
    ann: Annotated[
        list[str] | None,
        typer.Option(help="Also measure a saved-index back end: faiss-flat | faiss-hnsw | faiss-ivfpq."),
    ] = None,
    ann_docs: Annotated[int, typer.Option(help="Vectors in the ANN measurement.", min=1000)] = 1_000_000,
    ann_dim: Annotated[int, typer.Option(help="Their width.", min=4)] = 256,
    json_out: JsonOut = None,
) -> None:
    """Exact search vs FAISS flat, embedding vs a bare transformers forward, and (--ann) recall,
    speed and memory of the ANN back ends against exact search on clustered vectors (CPU)."""
    from unimm.commands.bench_serve import bench_ann, bench_retrieve
    from unimm.inference.ann import BACKENDS

    unknown = [b for b in ann or [] if b not in BACKENDS]
    if unknown:
        raise UnimmError(f"--ann {unknown[0]}: use {', '.join(BACKENDS)}")
    rows = bench_retrieve(docs=docs, dim=dim)
    rows += [bench_ann(backend, docs=ann_docs, dim=ann_dim) for backend in ann or []]
    for row in rows:
        extra = f", recall@10 {row['recall']}, {row['bytes_per_vector']} B/vector" if "recall" in row else ""
        typer.echo(
            f"{row['what']}: ours {row['ours_per_s']}/s, {row['baseline']} {row['baseline_per_s']}/s, "
            f"ratio {row['ratio']}{extra}"
        )
    _write_json(json_out, rows)


@bench_app.command("index")
@user_errors
def bench_index_cmd(
    docs: Annotated[
        list[int] | None, typer.Option("--docs", help="Index size; repeat for several.", min=1000)
    ] = None,
    dim: Annotated[int, typer.Option(help="Embedding width.", min=4)] = 256,
    nlist: Annotated[int, typer.Option(help="IVF lists \\[default: 4·√n].", min=0)] = 0,
    pq_m: Annotated[int, typer.Option(help="Bytes per vector \\[default: d/4].", min=0)] = 0,
    nprobe: Annotated[int, typer.Option(help="Lists searched per query.", min=1)] = 32,
    rerank: Annotated[
        int, typer.Option(help="unimm's re-ranked row: rerank·k candidates re-scored exactly.", min=0)
    ] = 4,
    queries: Annotated[int, typer.Option(help="Queries searched (top-10).", min=10)] = 1000,
    work: Annotated[
        Path | None, typer.Option(help="Folder for the synthetic indexes \\[default: the temp folder].")
    ] = None,
    json_out: JsonOut = None,
) -> None:
    """IVF-PQ at millions of synthetic documents: `unimm index build` and mapped search beside FAISS's
    own in-memory build, same settings (build time, peak memory, size, recall@10, queries/s)."""
    from unimm.commands.bench_index import bench_index, check_room

    sizes = docs or [1_000_000]
    check_room(sizes, dim, work)
    rows = bench_index(
        sizes,
        dim=dim,
        params={"nlist": nlist, "pq_m": pq_m, "nprobe": nprobe, "rerank": rerank},
        queries=queries,
        work=work,
    )
    keys = [
        "docs",
        "side",
        "build_s",
        "peak_added_mib",
        "size_mib",
        "open_s",
        "open_resident_mib",
        "recall_at_10",
        "per_s",
    ]
    _echo_table(rows, keys)
    typer.echo(f"IVF-PQ {rows[-1]['params']}; synthetic clustered unit vectors, d = {dim}")
    _write_json(json_out, rows)


@bench_app.command("serve")
@user_errors
def bench_serve_cmd(
    model: Annotated[
        Path | None, typer.Option("--model", help="Checkpoint folder (RUN/step-…); or --hidden-size.")
    ] = None,
    hidden_size: Annotated[
        int | None,
        typer.Option(help="Serve a random model of this width instead (tiny LLaVA scaled up).", min=16),
    ] = None,
    layers: Annotated[int, typer.Option(help="Its depth (with --hidden-size).", min=1)] = 8,
    requests: Annotated[int, typer.Option(help="Embedding requests (one text each).", min=20)] = 256,
    concurrency: Annotated[
        list[int] | None, typer.Option(help="Clients sending at once; repeat for several.", min=1, max=256)
    ] = None,
    chat_requests: Annotated[int, typer.Option(help="Chat completions (0: none).", min=0)] = 20,
    max_tokens: Annotated[int, typer.Option(help="Tokens per completion.", min=1)] = 16,
    serve_set: Annotated[
        list[str] | None,
        typer.Option("--serve-set", help="A setting of the server, serve.KEY=VALUE; repeat for several."),
    ] = None,
    json_out: JsonOut = None,
) -> None:
    """`unimm serve` on localhost under a bounded load vs the same work in one process (no HTTP)."""
    import tempfile

    from unimm.commands.bench_serve import bench_serve, scaled_checkpoint

    if (model is None) == (hidden_size is None):
        raise UnimmError("give --model CHECKPOINT, or --hidden-size N [--layers L] for a random model")
    if any(not item.startswith("serve.") or "=" not in item for item in serve_set or []):
        raise UnimmError("--serve-set: give serve.KEY=VALUE, e.g. --serve-set serve.batch_refill_ms=0")
    if chat_requests and chat_requests < 20:
        raise UnimmError("--chat-requests: 0 (no chat), or at least 20 (for the percentiles)")
    with tempfile.TemporaryDirectory(prefix="unimm-bench-serve-") as work:
        if hidden_size is not None:
            if hidden_size % 16:
                raise UnimmError(f"--hidden-size {hidden_size}: give a multiple of 16")
            model = scaled_checkpoint(Path(work), hidden_size=hidden_size, layers=layers)
        rows = bench_serve(
            str(model),
            requests=requests,
            concurrency=concurrency or [8],
            chat_requests=chat_requests,
            max_tokens=max_tokens,
            serve_args=[arg for item in serve_set or [] for arg in ("--set", item)],
        )
    for row in rows:
        typer.echo(
            f"{row['what']}, {row['concurrency']} clients: served {row['ours_per_s']}/s "
            f"(p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms), in-process {row['baseline_per_s']}/s "
            f"(p50 {row['baseline_p50_ms']} ms), ratio {row['ratio']}"
        )
    typer.echo(f"model: {rows[0]['parameters'] / 1e6:.1f} M parameters")
    _write_json(json_out, rows)


def _echo_table(rows: list[dict], keys: list[str]) -> None:
    from unimm.utils import text_table

    typer.echo(text_table(rows, keys))


def _write_json(path: Path | None, rows: list[dict]) -> None:
    if path is not None:
        from unimm.utils import atomic_write_json

        atomic_write_json(path, rows)


def _check_device(device: str) -> str:
    """The device the benches time on: ``cpu`` or CUDA, present (``auto`` resolved, via
    :func:`~unimm.utils.resolve_device`)."""
    from unimm.utils import resolve_device

    resolved = resolve_device(device)
    if resolved.type not in ("cpu", "cuda"):
        raise UnimmError(f"--device {device}: the benches run on cpu, cuda or cuda:N")
    return str(resolved)
