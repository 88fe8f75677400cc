"""Retrieval-augmented evaluation (the paper's section 4.5): ``unimm eval --benchmark NAME --rag INDEX``.

Each question of a generative benchmark — its image and text, as asked — is embedded by the
checkpoint being evaluated, the ``k`` nearest documents of ``INDEX`` (built with ``unimm embed``
from the user's knowledge base: in the paper, LLaVA-1.5's SFT data plus the benchmark's held-in
data) are read back, and put before the question in ``unimm chat``'s retrieval template::

    Retrieved item 1 (ID):  {its slices}  Retrieved item 2 (ID): …  {the question}

One model retrieves and answers, as in the paper. What was retrieved (ids and scores, best first)
is kept per question in the results.
"""

from __future__ import annotations

from typing import Any

from unimm.benchmarks.base import AnswerTask, BenchmarkData, ChoiceTask
from unimm.errors import UnimmError


def retrieve_for(
    encoder, data: BenchmarkData, index: str, model: str, k: int
) -> tuple[dict[str, list[list]], dict[str, list[list[list[Any]]]], dict[str, Any]]:
    """Per task of ``data`` that generates or scores replies: each question's context slices and
    its retrieved ``[id, score]`` pairs; and a description of the index for the results."""
    from unimm.inference.ann import Searcher
    from unimm.inference.chat import retrieved_slices
    from unimm.inference.documents import load_document

    tasks = [t for t in data.tasks if isinstance(t, AnswerTask | ChoiceTask)]
    if not tasks:
        raise UnimmError(
            f"--rag: {data.benchmark} is scored by ranking, not by replies; retrieval-augmented "
            "evaluation applies to the generative benchmarks (unimm eval --list)"
        )
    session = encoder.session
    searcher = Searcher.for_session(index, session, model)
    sources = searcher.manifest["data"]
    documents: dict[int, Any] = {}
    context: dict[str, list[list]] = {}
    retrieved: dict[str, list[list[list[Any]]]] = {}
    for task in tasks:
        queries = encoder(task.prompts, desc=f"{task.name}: queries", role="query")
        hits = searcher.search(queries, k)
        context[task.name], retrieved[task.name] = [], []
        for found in hits:
            for row, _ in found:
                if row not in documents:
                    documents[row] = load_document(searcher.rows[row], sources)
            context[task.name].append(retrieved_slices([documents[row] for row, _ in found]))
            retrieved[task.name].append([[searcher.rows[row]["id"], round(score, 6)] for row, score in found])
    about = {"index": str(index), "k": k, "backend": searcher.backend, "documents": len(searcher.rows)}
    return context, retrieved, about
