"""``unimm eval``: generative and retrieval scores of a checkpoint on records or shards, or on
a benchmark's own files.

    unimm eval --model RUN/step-000600 --data eval.jsonl --out eval.json
    unimm eval --benchmark coco --data coco/ --model RUN/step-000600 --out coco.json

The tasks, read off the records' shapes, and their scoring are :mod:`unimm.inference.evaluate`;
the benchmarks are :mod:`unimm.benchmarks`.
"""

from __future__ import annotations

from unimm.config import EvalConfig
from unimm.errors import UnimmError
from unimm.inference.evaluate import Evaluator, evaluate, load_samples, strict_json


def run(cfg: EvalConfig, *, progress: bool = True, evaluator: Evaluator | None = None) -> dict:
    """Load the checkpoint and the data, evaluate, write ``eval.out`` (JSON) when given.

    ``evaluator``: the checkpoint already loaded (``eval.model`` is then only recorded).
    """
    from pathlib import Path

    from unimm.outputs import claim_output
    from unimm.utils import atomic_write_json

    opts = cfg.eval
    if opts.out:
        claim_output(Path(opts.out), None, [*opts.data, opts.model])
    samples = load_samples(opts.data, opts.format, opts.image_root)
    ev = evaluator or Evaluator.load(
        opts.model,
        opts.device,
        opts.batch_size,
        dtype=opts.model_dtype,
        attn_implementation=opts.attn_implementation,
    )
    results = {
        "model": str(opts.model),
        "data": list(opts.data),
        **evaluate(ev, samples, opts, progress=progress),
    }
    if opts.out:
        atomic_write_json(opts.out, strict_json(results))
    return results


def run_benchmark(cfg: EvalConfig, *, progress: bool = True, session=None) -> dict:
    """Score ``eval.model`` on ``eval.benchmark`` read from ``eval.data``; write ``eval.out``.

    The release is read and checked before the checkpoint is loaded. The results hold the
    metrics, per query what recomputes them, and what produced them (checkpoint, data digest,
    library versions, settings). ``session``: the checkpoint already loaded.
    """
    import time
    from pathlib import Path

    from unimm.benchmarks import get_benchmark
    from unimm.benchmarks.run import KEEP, ItemEncoder
    from unimm.inference.session import Session
    from unimm.outputs import claim_output
    from unimm.utils import atomic_write_json, environment

    opts = cfg.eval
    benchmark = get_benchmark(opts.benchmark or "")
    judge = _judge(benchmark, opts)
    if opts.out:
        claim_output(Path(opts.out), None, [*opts.data, opts.model, *([opts.rag] if opts.rag else [])])
    data = benchmark.load(
        Path(opts.data[0]),
        image_root=Path(opts.image_root) if opts.image_root else None,
        limit=opts.limit,
        split=opts.split,
    )
    if session is None:
        session = Session.load(opts.model, **opts.session_options())
    encoder = ItemEncoder(session, opts.batch_size, progress=progress)
    started = time.perf_counter()
    scored, rag = _score(encoder, data, opts, judge)
    seconds = time.perf_counter() - started
    results = {
        "benchmark": benchmark.name,
        "model": str(opts.model),
        "data": {
            "path": str(opts.data[0]),
            "digest": data.digest(),
            "files": data.files,
            "images": len(set(data.images)),
        },
        "split": opts.split,
        "limit": opts.limit,
        "notes": data.notes,
        **({"rag": rag} if rag else {}),
        "metrics": scored["metrics"],
        "settings": {
            "batch_size": opts.batch_size,
            "device": str(session.device),
            "keep": KEEP,
            **({"judge": judge.url, "judge_model": judge.model, "judge_calls": judge.calls} if judge else {}),
        },
        "timing": {"seconds": round(seconds, 3), "inputs_embedded": encoder.forwarded},
        "environment": environment(),
        "per_query": scored["per_query"],
    }
    if opts.out:
        _write_submissions(data, scored, Path(opts.out), results["notes"])
        atomic_write_json(opts.out, strict_json(results))
    return results


def _judge(benchmark, opts):
    """The judge of a judged benchmark (``--judge``), else ``None``.

    Raises:
        UnimmError: a judged benchmark without ``--judge``.
    """
    if benchmark.module != "unimm.benchmarks.judged":
        return None
    from unimm.benchmarks.judged import Judge

    if not opts.judge:
        raise UnimmError(
            f"--benchmark {benchmark.name} is scored by a judge model: give --judge URL of an "
            "OpenAI-compatible endpoint (and --judge-model; the key, if any, in $OPENAI_API_KEY)"
        )
    return Judge(opts.judge, opts.judge_model)


def _score(encoder, data, opts, judge) -> tuple[dict, dict | None]:
    """The benchmark's scores, retrieval-augmented with ``--rag`` (each question's retrieved
    documents then kept in its record), and the description of the index used."""
    from unimm.benchmarks.run import run_benchmark as score

    context, retrieved, rag = None, {}, None
    if opts.rag:
        from unimm.benchmarks.augmented import retrieve_for

        context, retrieved, rag = retrieve_for(encoder, data, opts.rag, str(opts.model), opts.rag_k)
    scored = score(encoder, data, context=context, judge=judge)
    for task, found in retrieved.items():
        for record, hits in zip(scored["per_query"][task], found, strict=True):
            record["retrieved"] = hits
    return scored, rag


def _write_submissions(data, scored: dict, out, notes: list[str]) -> None:
    """Beside ``out``: per task without released answers, the replies in the server's format."""
    from unimm.benchmarks.answering import submission
    from unimm.benchmarks.base import AnswerTask
    from unimm.utils import atomic_write_json

    for task in data.tasks:
        if isinstance(task, AnswerTask) and task.submission is not None:
            path = out.with_name(f"{out.stem}.{task.name}.submission.json")
            atomic_write_json(path, submission(task, scored["per_query"][task.name]))
            notes.append(f"{task.name}: the replies for the benchmark's server are in {path}")
