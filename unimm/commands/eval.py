"""``unimm eval``: generative and retrieval scores of a checkpoint on records or shards.

    unimm eval --model RUN/step-000600 --data eval.jsonl --out eval.json

The tasks, read off the records' shapes, and their scoring are :mod:`unimm.inference.evaluate`.
"""

from __future__ import annotations

from unimm.config import EvalConfig
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
