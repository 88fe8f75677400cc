"""Search and serving benchmarks, ours against a baseline in the same run, as ratios.

unimm bench retrieve           # exact search vs FAISS flat; ANN recall, speed and memory; embedding
unimm bench serve              # `unimm serve` under a bounded load vs the same work in-process
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from unimm.utils import bench_timer


def bench_retrieve(
    *, docs: int = 100_000, dim: int = 1024, queries: int = 256, repeats: int = 3
) -> list[dict]:
    """Exact blocked search vs FAISS flat (queries/s), and embedding vs a bare transformers forward."""
    import torch

    from unimm.inference.search import exact_search

    timer = bench_timer("cpu")
    g = torch.Generator().manual_seed(0)
    index = torch.nn.functional.normalize(torch.randn(docs, dim, generator=g), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(queries, dim, generator=g), dim=-1)
    rows = []
    ours = timer(lambda: exact_search(q, index, 10))
    theirs = None
    try:
        import faiss

        searcher = faiss.IndexFlatIP(dim)  # built once, outside the timing: search against search
        searcher.add(index.numpy())
        theirs = timer(lambda: searcher.search(q.numpy(), 10))
        # same answers (checked, not assumed): the same score at every rank (rows may differ only
        # among scores within 1e-6, which exact_search orders by row)
        got = exact_search(q, index, 10)[0]
        want = torch.from_numpy(searcher.search(q.numpy(), 10)[0])
        if not torch.allclose(got, want, atol=2e-6, rtol=0):
            raise RuntimeError("exact search and FAISS flat disagree")
    except ImportError:  # FAISS missing: report ours alone
        pass
    what = f"search {docs} x {dim}, {queries} queries, top-10"
    rows.append(
        {
            "what": what,
            "ours_per_s": round(queries / ours, 1),
            "baseline": "faiss IndexFlatIP search",
            "baseline_per_s": round(queries / theirs, 1) if theirs else None,
            "ratio": round(theirs / ours, 3) if theirs else None,
        }
    )
    if theirs:  # our torch path alone, as it runs without FAISS (and on a GPU)
        from unimm.inference.search import blocked_search

        alone = timer(lambda: blocked_search(q, index, 10))
        rows.append(
            {
                "what": f"{what}, torch only (no FAISS installed)",
                "ours_per_s": round(queries / alone, 1),
                "baseline": "faiss IndexFlatIP search",
                "baseline_per_s": round(queries / theirs, 1),
                "ratio": round(theirs / alone, 3),
            }
        )
    rows.append(_bench_embedding(timer, repeats))
    return rows


def _bench_embedding(timer, repeats: int) -> dict:
    """Our embedding pass vs the bare transformers forward (LlavaModel) on the same tiny batch."""
    import torch

    from unimm.data.adapters import load_decoded_records
    from unimm.data.collate import Collator
    from unimm.data.synthetic import write_synthetic
    from unimm.model.core import RetrievalHead, UnimmModel, load_mllm
    from unimm.tiny import save_tiny_llava

    work = Path(tempfile.mkdtemp(prefix="unimm-bench-embed-"))
    try:
        data = write_synthetic(work / "data", 32)
        samples = load_decoded_records(data)
        folder = save_tiny_llava(work / "model", [t for s in samples for t in s.texts()])
        mllm, processor = load_mllm(folder)
        model = UnimmModel(mllm, RetrievalHead(mllm.config.text_config.hidden_size, 64)).eval()
        batch = Collator.for_model(model, processor)(samples)
        batch["views"] = [(b, len(spans) - 1) for b, spans in enumerate(batch["spans"])]
        with torch.no_grad():
            ours = timer(lambda: model.embed(batch))
            bare = timer(
                lambda: mllm.model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    **batch["image_inputs"],
                )
            )
        return {
            "what": "embed 32 synthetic documents (tiny LLaVA)",
            "ours_per_s": round(32 / ours, 1),
            "baseline": "bare transformers forward",
            "baseline_per_s": round(32 / bare, 1),
            "ratio": round(bare / ours, 3),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_ann(backend: str, *, docs: int, dim: int, queries: int = 256, k: int = 10) -> dict:
    """A saved-index back end against exact search (FAISS flat) on clustered vectors: recall@k,
    queries/s (the ratio is its speed-up), bytes per vector and build time."""
    import numpy as np
    import torch

    from unimm.config import IndexOptions
    from unimm.data.synthetic import clustered_unit_parts
    from unimm.inference.ann_build import faiss_index
    from unimm.inference.search import exact_search

    parts = clustered_unit_parts(docs, dim, part_size=65536, stored=False)
    data = torch.from_numpy(np.concatenate(list(parts)))
    g = torch.Generator().manual_seed(1)
    picks = torch.randint(0, docs, (queries,), generator=g)
    q = torch.nn.functional.normalize(data[picks] + 0.05 * torch.randn(queries, dim, generator=g), dim=1)
    timer = bench_timer("cpu")
    exact = timer(lambda: exact_search(q, data, k))
    _, truth = exact_search(q, data, k)
    start = time.perf_counter()
    index, params = faiss_index(data.numpy(), IndexOptions(backend=backend))
    built = time.perf_counter() - start
    qn = q.numpy()
    ann = timer(lambda: index.search(qn, k))
    _, found = index.search(qn, k)
    recall = sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), truth.tolist(), strict=True))
    import faiss

    size = len(faiss.serialize_index(index))
    return {
        "what": f"{backend} {docs} x {dim}, {queries} queries, top-{k}",
        "params": params,
        "recall": round(recall / (k * queries), 4),
        "ours_per_s": round(queries / ann, 1),
        "baseline": "exact search",
        "baseline_per_s": round(queries / exact, 1),
        "ratio": round(exact / ann, 3),
        "bytes_per_vector": round(size / docs, 1),
        "float32_bytes_per_vector": 4 * dim,
        "build_s": round(built, 1),
    }


def _percentiles(latencies: list[float]) -> dict[str, float]:
    import statistics

    cuts = statistics.quantiles(latencies, n=100, method="inclusive")  # 1 % steps
    return {
        "p50_ms": round(statistics.median(latencies) * 1e3, 1),
        "p95_ms": round(cuts[94] * 1e3, 1),
        "p99_ms": round(cuts[98] * 1e3, 1),
    }


def _load(url: str, path: str, bodies: list[dict], concurrency: int) -> tuple[float, list[float]]:
    """POST every body with ``concurrency`` clients; ``(seconds in all, latency per request)``.

    Each client is a thread holding one keep-alive connection of the standard library's
    ``http.client``: the load generator shares this machine's cores with the server, and that
    client costs a third of httpx's CPU per request (measured: 0.10 against 0.34 ms), which
    the server's model gets back."""
    import concurrent.futures
    import http.client
    import json
    import threading
    from urllib.parse import urlsplit

    where = urlsplit(url)
    local = threading.local()
    payloads = [json.dumps(body).encode() for body in bodies]  # encoded before the clock starts

    def one(payload: bytes) -> float:
        if not hasattr(local, "connection"):
            local.connection = http.client.HTTPConnection(where.hostname, where.port, timeout=600)
        start = time.perf_counter()
        local.connection.request("POST", path, payload, {"content-type": "application/json"})
        response = local.connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {data[:300].decode(errors='replace')}")
        json.loads(data)  # what a client does with the answer, timed too
        return time.perf_counter() - start

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, payloads))
    return time.perf_counter() - start, latencies


def _served(model: str, serve_args: list[str]):
    """``unimm serve`` in its own process on a free localhost port (as deployed: the load
    generator's threads do not share its interpreter); yields its URL, stops it after."""
    import contextlib
    import socket
    import subprocess
    import sys

    import httpx2 as httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "unimm.cli", "serve", "--model", model, "--port", str(port), *serve_args]
    # its log (an access line per request, as deployed) goes to a file: a pipe nobody reads
    # fills after a few hundred requests and then blocks the server's event loop for good
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 -- closed when the server stops
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"

    def tail() -> str:
        log.seek(0)
        return log.read()[-2000:]

    @contextlib.contextmanager
    def running():
        try:
            deadline = time.monotonic() + 300
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"unimm serve stopped: {tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(url + "/health", timeout=5).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("unimm serve did not start within 300 s")
                time.sleep(0.2)
            yield url
        finally:
            server.terminate()
            server.wait(timeout=60)
            log.close()

    return running()


def scaled_checkpoint(folder: Path, *, hidden_size: int, layers: int, embed_dim: int = 256) -> Path:
    """A checkpoint of random weights whose forward pass dominates serving: the tiny LLaVA's
    config scaled to ``hidden_size`` × ``layers`` (MLP 2 × wider), a retrieval head of
    ``embed_dim``; nothing downloaded, nothing trained (throughput needs no trained weights)."""
    from unimm.model.checkpoint import save_checkpoint
    from unimm.model.core import RetrievalHead, UnimmModel, load_mllm
    from unimm.tiny import save_tiny_llava

    texts = [f"document {i}: red circles and blue squares" for i in range(64)]
    base = save_tiny_llava(folder / "base", texts, hidden_size=hidden_size, num_layers=layers)
    mllm, processor = load_mllm(base)
    model = UnimmModel(mllm, RetrievalHead(hidden_size, embed_dim)).eval()
    return save_checkpoint(folder / "checkpoint", model, processor, {"step": 0})


def _in_process(session, texts: list[str], questions: list[str], batch: int, max_tokens: int) -> dict:
    """The served work done in this process, no HTTP: embeddings in batches of ``batch`` (what
    an offline job runs), completions one by one; seconds in all and latency of each."""
    from unimm.data.samples import Sample, Slice

    samples = [Sample.of_slices([Slice.of_text(t)]) for t in texts]
    session.embed_views(samples[:batch])  # warm up
    start, waits = time.perf_counter(), []
    for first in range(0, len(samples), batch):
        began = time.perf_counter()
        session.embed_views(samples[first : first + batch])
        waits += [time.perf_counter() - began] * len(samples[first : first + batch])
    embed_s = time.perf_counter() - start
    start, chat_waits = time.perf_counter(), []
    for q in questions:
        began = time.perf_counter()
        session.generate_counted(Sample.of_slices([Slice.of_text(q)]), max_new_tokens=max_tokens)
        chat_waits.append(time.perf_counter() - began)
    return {
        "embed_s": embed_s,
        "waits": waits,
        "chat_s": time.perf_counter() - start,
        "chat_waits": chat_waits,
    }


def _row(
    what: str, count: int, served_s: float, latencies: list[float], local_s: float, waits: list, digits: int
) -> dict:
    """One measured row: both sides' rates, the served latencies, the ratio."""
    return {
        "what": what,
        "ours_per_s": round(count / served_s, digits),
        **_percentiles(latencies),
        "baseline_per_s": round(count / local_s, digits),
        "baseline_p50_ms": _percentiles(waits)["p50_ms"],
        "ratio": round(local_s / served_s, 3),
    }


def bench_serve(
    model: str,
    *,
    requests: int = 256,
    concurrency: list[int] | int = 8,
    chat_requests: int = 16,
    max_tokens: int = 16,
    serve_args: list[str] | None = None,
) -> list[dict]:
    """``unimm serve`` on localhost under a bounded load (``requests`` embedding requests and
    ``chat_requests`` chat completions, from each number of ``concurrency`` clients) against the
    same work in one process without HTTP, measured again right before each level: throughput
    ratio, p50/p95/p99 latency of each side. The model is loaded twice meanwhile (here and in the
    server): size the machine for that."""
    from unimm.inference.session import Session

    levels = [concurrency] if isinstance(concurrency, int) else list(concurrency)
    session, batch = Session.load(model), 32  # serve.max_batch's default
    texts = [
        f"document {i}: " + " ".join(["red circles and blue squares"] * (1 + i % 4)) for i in range(requests)
    ]
    questions = [f"Question {i}: which shapes are red?" for i in range(chat_requests)]
    size = sum(p.numel() for p in session.model.parameters())
    rows = []
    with _served(model, ["--max-batch", str(batch), "--name", "bench", *(serve_args or [])]) as url:
        _load(url, "/v1/embeddings", [{"input": t} for t in texts[:batch]], max(levels))  # warm up
        chats = [
            {"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "temperature": 0}
            for q in questions
        ]
        for clients in levels:
            # the baseline again right before each level (the idle server waits meanwhile): this
            # machine's speed drifts by 15 % between minutes, and a ratio must not carry that
            local = _in_process(session, texts, questions, batch, max_tokens)
            served_s, latencies = _load(url, "/v1/embeddings", [{"input": t} for t in texts], clients)
            chat_s, chat_latencies = (
                _load(url, "/v1/chat/completions", chats, clients) if chats else (0.0, [])
            )
            common = {"concurrency": clients, "parameters": size, "baseline": "same work in-process, no HTTP"}
            what = f"embeddings: {requests} requests of 1 text, batches of {batch}"
            local_s, waits = local["embed_s"], local["waits"]
            rows.append(_row(what, requests, served_s, latencies, local_s, waits, 1) | common)
            if chats:
                what = f"chat: {chat_requests} completions of {max_tokens} tokens (greedy)"
                local_s, waits = local["chat_s"], local["chat_waits"]
                rows.append(_row(what, chat_requests, chat_s, chat_latencies, local_s, waits, 2) | common)
    return rows
