"""``unimm serve``'s ASGI application: one loaded session behind an OpenAI-compatible HTTP API.

    POST /v1/embeddings        {"input": "text" | [parts] | [...], "input_type": "document" | "query"}
    POST /v1/chat/completions  {"messages": [...], "stream": true, "retrieval": {"top_k": 2}}
    POST /v1/search            {"query": "text" | [parts] | [...], "top_k": 10}
    GET  /v1/models, GET /health, GET /metrics (Prometheus), GET /docs (OpenAPI: /openapi.json)

A search result (and a retrieved document in a chat completion) is one shape whatever the index
was built from: ``{"id", "score", "text", "images", "metadata", "source": {"file", "line"}}``.
Every request gets an id (``X-Request-ID``), one access-log line and its metrics
(:mod:`unimm.inference.monitoring`).

Concurrent embedding requests are batched: inputs wait at most ``batch_wait_ms`` for others to
join, up to ``max_batch`` per forward pass. The model runs in one worker thread at a time (a
lock), so a long generation and embedding batches take turns instead of racing. Vectors are the
session's ``embed_views``, the same call ``unimm embed`` and ``unimm retrieve`` make.

FastAPI is the ``serve`` extra (``pip install "unimm[serve]"``); ``unimm serve`` checks for it
before importing this module.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import functools
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request  # the serve extra; FastAPI reads the routes' annotations
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from unimm.data.samples import Sample
from unimm.errors import UnimmError
from unimm.inference import openapi
from unimm.inference.api import ApiError, Limits, chat_request, error_type, inputs_of, number
from unimm.inference.monitoring import REQUEST_ID_HEADER, ServerMetrics, log_access, request_id


class EmbedBatcher:
    """Collects samples from concurrent requests into batches for one embedding function."""

    def __init__(
        self,
        embed: Callable[[list[Sample]], tuple[torch.Tensor, list[int]]],
        *,
        max_batch: int,
        wait_s: float,
        refill_s: float = 0.0,
    ) -> None:
        self.embed, self.max_batch, self.wait_s, self.refill_s = embed, max_batch, wait_s, refill_s
        self.queue: asyncio.Queue[tuple[Sample, asyncio.Future]] = asyncio.Queue()
        # sizes of the latest batches run (for tests and the bench); bounded: a server runs for days
        self.batches: collections.deque[int] = collections.deque(maxlen=1024)
        self.last_size, self.last_seconds = 1, 0.0

    async def __call__(self, samples: list[Sample]) -> tuple[torch.Tensor, int]:
        """The samples' vectors ``[n, d]`` and their tokens in all."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in samples]
        for sample, future in zip(samples, futures, strict=True):
            self.queue.put_nowait((sample, future))
        done = await asyncio.gather(*futures)
        return torch.stack([v for v, _ in done]), sum(n for _, n in done)

    async def run(self) -> None:
        """Serve the queue until cancelled: each batch takes what is queued when the model is free
        (up to ``max_batch``), waiting ``wait_s`` for more only if asked. Under load, requests
        queue while a batch runs and the next batch takes them all; alone, a request waits for
        nothing.

        Refill: the clients answered by a batch of ``n`` send their next requests a moment after;
        taken at once, the first to arrive would make a batch of one and the others wait through
        it. So the next batch waits for up to ``n`` inputs, at most ``refill_s`` and a tenth of the
        last batch's time; after a batch of one it waits for nothing."""
        while True:
            batch = [await self.queue.get()]
            now = time.monotonic()
            deadline = now + self.wait_s
            refill = now + min(self.refill_s, 0.1 * self.last_seconds)
            while len(batch) < self.max_batch:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                left = (max(deadline, refill) if len(batch) < self.last_size else deadline) - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            await self._run(batch)

    async def _run(self, batch: list[tuple[Sample, asyncio.Future]]) -> None:
        self.batches.append(len(batch))
        began = time.monotonic()
        try:
            vectors, counts = await asyncio.to_thread(self.embed, [s for s, _ in batch])
        except Exception as exc:  # handed to the requests waiting on this batch
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            self.last_size, self.last_seconds = len(batch), time.monotonic() - began
        for (_, future), vector, count in zip(batch, vectors, counts, strict=True):
            if not future.done():
                future.set_result((vector, count))


class ServerState:
    """What the application serves: a session, an optional searcher, limits and settings."""

    def __init__(
        self,
        session,
        searcher=None,
        *,
        name: str,
        limits: Limits,
        api_key: str | None = None,
        max_batch: int = 32,
        batch_wait_ms: float = 0.0,
        batch_refill_ms: float = 0.0,
        default_tokens: int = 128,
    ) -> None:
        self.session, self.searcher, self.name, self.limits = session, searcher, name, limits
        self.api_key, self.default_tokens = api_key, default_tokens
        self.lock = threading.Lock()
        self.metrics = ServerMetrics()
        self.batcher = EmbedBatcher(
            self._embed, max_batch=max_batch, wait_s=batch_wait_ms / 1e3, refill_s=batch_refill_ms / 1e3
        )
        self.created = int(time.time())

    def _embed(self, samples: list[Sample]) -> tuple[torch.Tensor, list[int]]:
        self.metrics.observe_batch(len(samples))
        with self.lock:
            return self.session.embed_counted(samples)

    def documents(
        self, hits: list[tuple[int, float]], loaded: list[Sample] | None = None
    ) -> list[dict[str, Any]]:
        """The found documents as the API gives them (``loaded``: their samples, when already read)."""
        from unimm.inference.documents import document_view

        rows, data = self.searcher.rows, self.searcher.manifest["data"]
        samples = loaded or [None] * len(hits)
        return [
            {"id": rows[r]["id"], "score": round(s, 6), **document_view(rows[r], data, sample)}
            for (r, s), sample in zip(hits, samples, strict=True)
        ]


def _search_filters(body: dict[str, Any], searcher) -> dict[str, Any]:
    """``filter`` of a search request: ``{field: value}`` on the documents' metadata, for a
    server searching a vector database (``--db``)."""
    filters = body.get("filter")
    if filters is None:
        return {}
    if not isinstance(filters, dict) or not all(
        isinstance(v, (str, int, bool)) and not isinstance(v, float) for v in filters.values()
    ):
        raise ApiError(
            400,
            "'filter' must be an object of metadata fields and string, integer or boolean values",
            param="filter",
        )
    if not hasattr(searcher, "check_filters"):
        raise ApiError(
            400, "'filter' needs a server searching a vector database (unimm serve --db)", param="filter"
        )
    try:
        searcher.check_filters(filters)
    except UnimmError as exc:
        raise ApiError(400, str(exc).removeprefix("--filter "), param="filter") from None
    return filters


def _input_type(body: dict[str, Any]) -> str:
    """``input_type`` of an embeddings request: ``document`` (the default, as ``unimm embed``)
    or ``query`` (as ``unimm retrieve`` encodes queries), which picks the instruction."""
    from unimm.data.instructions import INSTRUCTION_ROLES

    kind = body.get("input_type", "document")
    if kind not in INSTRUCTION_ROLES:
        raise ApiError(400, "'input_type' must be document or query", param="input_type")
    return kind


def _vector_payload(vector: torch.Tensor, encoding: str) -> Any:
    if encoding == "base64":  # what the openai client asks for by default: little-endian float32
        return base64.b64encode(vector.float().numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()


_OPEN_PATHS = ("/health", "/docs", "/openapi.json")
"""Paths answered without the API key."""


class Gatekeeper:
    """The outermost ASGI layer: the API key check, the request id (``X-Request-ID`` back on
    every answer), the metrics and the access log line of every request, a 401 included.

    A plain ASGI layer that only wraps ``send``: Starlette's ``@app.middleware("http")`` runs each
    request through a task group and memory streams, and with two of them that machinery was a
    quarter of a busy server's event-loop time (py-spy, ``unimm bench serve``)."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        rid = request_id(headers.get(REQUEST_ID_HEADER))
        start, head = time.perf_counter(), {"status": 500, "seconds": None}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                head["status"], head["seconds"] = message["status"], time.perf_counter() - start
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), rid.encode())],
                }
            await send(message)

        path = scope["path"]
        try:
            key = self.state.api_key
            if key and path not in _OPEN_PATHS and headers.get("authorization", "") != f"Bearer {key}":
                error = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")
                await JSONResponse(error.body(), status_code=401)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            status = head["status"]
            seconds = head["seconds"] if head["seconds"] is not None else time.perf_counter() - start
            self.state.metrics.observe_request(
                path, status, seconds, error_type(status) if status >= 400 else None
            )
            client = scope.get("client")
            log_access(rid, scope["method"], path, status, seconds, client[0] if client else None)


async def _samples_of(body: dict[str, Any], key: str, limits: Limits) -> list[Sample]:
    """:func:`inputs_of`: on the event loop for text alone (cheaper than a thread hop), in a
    worker thread when content parts may hold images to decode."""
    value = body.get(key)
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return inputs_of(body, key, limits)
    return await asyncio.to_thread(inputs_of, body, key, limits)


def create_app(state: ServerState):
    """The FastAPI application serving ``state``."""

    # Long only because the routes are closures over ``state``; each is a few lines.
    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(state.batcher.run())
        yield
        task.cancel()

    from unimm import __version__

    app = FastAPI(
        title="unimm serve",
        version=__version__,
        description="One multimodal model that generates and retrieves, behind OpenAI-compatible routes.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(UnimmError)
    async def server_problem(request, exc: UnimmError):  # e.g. an indexed document's shard is gone
        error = ApiError(500, str(exc))
        return JSONResponse(error.body(), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):  # unknown route, wrong method
        error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(error.body(), status_code=exc.status_code)

    app.add_middleware(Gatekeeper, state=state)  # outermost: it sees every answer, a 401 included

    async def body_of(request: Request) -> dict[str, Any]:
        limit = state.limits.max_request_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise ApiError(413, f"request body over {limit} bytes (serve.max_request_bytes)")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise ApiError(413, f"request body over {limit} bytes (serve.max_request_bytes)")
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the body is not JSON ({exc})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        model = body.get("model")
        if model not in (None, state.name):
            raise ApiError(404, f"model {model!r} is not served here; use {state.name!r}", param="model")
        return body

    @app.get("/health")
    async def health():
        index = state.searcher
        return {
            "status": "ok",
            "model": state.name,
            "index": None if index is None else {"count": index.count, "backend": index.backend},
        }

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        from fastapi.responses import Response

        payload, content_type = state.metrics.exposition()
        return Response(payload, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        card = {"id": state.name, "object": "model", "created": state.created, "owned_by": "unimm"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/embeddings", openapi_extra=openapi.body(openapi.EMBEDDINGS, "the vectors, as OpenAI's"))
    async def embeddings(request: Request):
        body = await body_of(request)
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise ApiError(400, "'encoding_format' must be float or base64", param="encoding_format")
        trained = state.session.meta["inference"]["dimensions"]
        dim = body.get("dimensions")
        if dim is not None and (isinstance(dim, bool) or dim not in trained):
            sizes = ", ".join(str(d) for d in sorted(trained, reverse=True))
            raise ApiError(
                400, f"'dimensions' {dim!r}: this model was trained for {sizes}", param="dimensions"
            )
        samples = await _samples_of(body, "input", state.limits)
        vectors, tokens = await state.batcher(state.session.instruct(samples, _input_type(body)))
        if dim is not None:
            from unimm.model.core import truncate

            vectors = truncate(vectors, dim)
        data = [
            {"object": "embedding", "index": i, "embedding": _vector_payload(v, encoding)}
            for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        # a response, not a dict: FastAPI would walk every float of every vector to encode it
        return JSONResponse({"object": "list", "data": data, "model": state.name, "usage": usage})

    @app.post(
        "/v1/search",
        openapi_extra=openapi.body(
            openapi.SEARCH, "the top_k documents of each query", openapi.SEARCH_ANSWER
        ),
    )
    async def search(request: Request):
        body = await body_of(request)
        if state.searcher is None:
            raise ApiError(400, "no index is loaded: start the server with --index DIR", code="no_index")
        top_k = number(body, "top_k", 10, 1, state.limits.max_top_k, int)
        filters = _search_filters(body, state.searcher)
        samples = await _samples_of(body, "query", state.limits)
        vectors, _ = await state.batcher(state.session.instruct(samples, "query"))
        search = functools.partial(state.searcher.search, **({"filters": filters} if filters else {}))
        hits = await asyncio.to_thread(search, vectors, top_k)  # off the event loop
        found = await asyncio.to_thread(lambda: [state.documents(h) for h in hits])  # reads shards
        data = [{"index": i, "results": results} for i, results in enumerate(found)]
        return {"object": "list", "data": data, "model": state.name}

    @app.post("/v1/chat/completions", openapi_extra=openapi.body(openapi.CHAT, "OpenAI's chat completion"))
    async def chat(request: Request):
        body = await body_of(request)
        req = await asyncio.to_thread(
            chat_request,
            body,
            state.limits,
            default_tokens=state.default_tokens,
            has_index=state.searcher is not None,
        )
        retrieved, prompt = await _prompt(state, req)
        meta = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": state.name,
            "retrieved": retrieved,
        }
        if req.stream:
            return StreamingResponse(_stream(state, req, prompt, meta), media_type="text/event-stream")
        text, usage = await asyncio.to_thread(_generate, state, req, prompt, None)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": usage.pop("finish"),
        }
        return {"object": "chat.completion", **meta, "choices": [choice], "usage": usage}

    state.metrics.routes = frozenset(route.path for route in app.routes)
    return app


async def _prompt(state: ServerState, req) -> tuple[list[dict], Sample]:
    """The retrieved documents (if asked) and the prompt sample, as ``unimm chat`` builds them."""
    from unimm.inference.chat import build_prompt
    from unimm.inference.documents import load_document

    if not req.top_k:
        return [], build_prompt(req.question, [], req.history)
    query = build_prompt(req.question, [], req.history)
    vector, _ = await state.batcher(state.session.instruct([query], "query"))
    (hits,) = await asyncio.to_thread(state.searcher.search, vector, req.top_k)
    data = state.searcher.manifest["data"]
    docs = await asyncio.to_thread(lambda: [load_document(state.searcher.rows[r], data) for r, _ in hits])
    return state.documents(hits, docs), build_prompt(req.question, docs, req.history)


def _generate(state: ServerState, req, prompt: Sample, streamer) -> tuple[str, dict]:
    with state.lock:
        if req.seed is not None:
            torch.manual_seed(req.seed)
        text, counts = state.session.generate_counted(
            prompt,
            max_new_tokens=req.max_new_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            streamer=streamer,
        )
    state.metrics.observe_generation(counts["prompt_tokens"], counts["completion_tokens"])
    finish = "length" if counts["completion_tokens"] >= req.max_new_tokens else "stop"
    return text, counts | {"total_tokens": sum(counts.values()), "finish": finish}


async def _stream(state: ServerState, req, prompt: Sample, meta: dict) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, one chunk per decoded piece, the finish, ``[DONE]``."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(
        state.session.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600
    )
    job = asyncio.create_task(asyncio.to_thread(_generate, state, req, prompt, streamer))

    def event(delta: dict, finish: str | None = None, **extra) -> str:
        chunk = {"object": "chat.completion.chunk", **meta, **extra}
        chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
        return f"data: {json.dumps(chunk)}\n\n"

    yield event({"role": "assistant", "content": ""})
    meta = {k: v for k, v in meta.items() if k != "retrieved"}  # said once, in the first chunk
    pieces = iter(streamer)
    while True:
        piece = await asyncio.to_thread(next, pieces, None)
        if piece is None:
            break
        if piece:
            yield event({"content": piece})
    _, usage = await job
    finish = usage.pop("finish")
    yield event({}, finish)
    if req.include_usage:
        chunk = {"object": "chat.completion.chunk", **meta, "choices": [], "usage": usage}
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"
