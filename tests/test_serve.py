"""`unimm serve` on a live localhost server, driven by the official `openai` client and httpx."""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import logging

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")  # the HTTP client the openai client is built on

from unimm.config import ChatOptions, ServeOptions  # noqa: E402
from unimm.data.samples import Sample, Slice  # noqa: E402
from unimm.inference.serving import Background, build_state  # noqa: E402


@pytest.fixture(scope="module")
def served(trained):
    """A server over the tiny checkpoint and its index (module-wide: loading is the slow part)."""
    checkpoint, index = trained
    state = build_state(ServeOptions(model=str(checkpoint), index=str(index), name="tiny", max_batch=8))
    with Background(state) as url:
        yield state, url


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0)


def data_url(path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def test_embeddings_equal_unimm_embed(tmp_path, trained, served, client, captions_and_images):
    """Text through the openai client (base64 transport, its default) and image + text parts as
    content: the same vectors `unimm embed` stores for the same records."""
    from unimm.commands.embed import run
    from unimm.config import EmbedConfig, build_config
    from unimm.inference.store import load_index

    checkpoint, _ = trained
    csv, images = captions_and_images
    options = {"embed.model": str(checkpoint), "embed.data": [str(csv)], "embed.out": str(tmp_path / "i")}
    run(build_config(EmbedConfig, options=options | {"embed.dtype": "float32"}), progress=False)
    stored, rows, _ = load_index(tmp_path / "i")
    inputs = [
        [
            {"type": "image_url", "image_url": {"url": data_url(images[i])}},
            {"type": "text", "text": f"colour {i}"},
        ]
        for i in range(len(rows))
    ]
    got = client.embeddings.create(model="tiny", input=inputs)
    vectors = torch.tensor([d.embedding for d in got.data])
    torch.testing.assert_close(vectors, stored, atol=1e-5, rtol=1e-5)
    assert got.usage.prompt_tokens > 0

    texts = ["two red circles", "a blue square"]
    session = served[0].session
    want = session.embed_views([Sample.of_slices([Slice.of_text(t)]) for t in texts])
    for extra in ({}, {"encoding_format": "float"}):  # the client asks for base64 and decodes it
        got = client.embeddings.create(model="tiny", input=texts, **extra)
        torch.testing.assert_close(torch.tensor([d.embedding for d in got.data]), want, atol=1e-5, rtol=1e-5)


@pytest.fixture
def captions_and_images(tmp_path, image_dir):
    lines = ["id,image,caption"] + [f"c{i},imgs/{i}.jpg,colour {i}" for i in range(4)]
    (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "captions.csv", [image_dir / f"{i}.jpg" for i in range(4)]


def test_concurrent_requests_are_batched_and_answered_alike(served):
    state, url = served
    texts = [f"document number {i}" for i in range(12)]
    alone = [
        httpx.post(url + "/v1/embeddings", json={"input": t}).json()["data"][0]["embedding"] for t in texts
    ]
    state.batcher.batches.clear()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        together = list(
            pool.map(
                lambda t: httpx.post(url + "/v1/embeddings", json={"input": t}).json()["data"][0][
                    "embedding"
                ],
                texts,
            )
        )
    assert max(state.batcher.batches) > 1  # some requests shared a forward pass
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), atol=1e-5, rtol=1e-5)


def test_streamed_rag_chat_equals_the_whole_answer(served, client):
    messages = [{"role": "user", "content": "Which shapes are red?"}]
    whole = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, extra_body={"retrieval": {"top_k": 2}}
    )
    retrieved = whole.model_extra["retrieved"]
    assert len(retrieved) == 2 and all({"id", "score"} <= set(r) for r in retrieved)
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"retrieval": {"top_k": 2}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == whole.choices[0].message.content
    assert chunks[0].model_extra["retrieved"] == retrieved
    assert all("retrieved" not in c.model_extra for c in chunks[1:])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.choices[0].finish_reason in ("stop", "length")
    from unimm.inference.chat import ChatSession

    state = served[0]
    opts = ChatOptions(model=state.searcher.manifest["model"], index=str(state.searcher.folder), top_k=2)
    local = ChatSession(dataclasses.replace(opts, max_new_tokens=6))
    assert local.answer([Slice.of_text("Which shapes are red?")]) == whole.choices[0].message.content
    assert local.last_retrieved == [r["id"] for r in retrieved]  # as `unimm chat --index` answers


def test_a_server_side_problem_is_a_500_naming_it(served, monkeypatch):
    """The index's shards were moved away after the server started: the retrieval-augmented
    answer fails with the reason, in the API's error shape (not a bare traceback page)."""
    state, url = served
    monkeypatch.setitem(state.searcher.manifest, "data", ["/nonexistent"])
    body = {"messages": [{"role": "user", "content": "red?"}], "retrieval": True, "max_tokens": 2}
    response = httpx.post(url + "/v1/chat/completions", json=body)
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["type"] == "server_error" and "is not in /nonexistent" in error["message"]


def test_search_and_models(served, client):
    state, url = served
    found = httpx.post(url + "/v1/search", json={"query": ["red circles", "blue"], "top_k": 3}).json()
    assert [len(d["results"]) for d in found["data"]] == [3, 3]
    vectors = state.session.embed_views([Sample.of_slices([Slice.of_text("red circles")])])
    (hits,) = state.searcher.search(vectors, 3)
    assert [r["id"] for r in found["data"][0]["results"]] == [state.searcher.rows[r]["id"] for r, _ in hits]
    assert [m.id for m in client.models.list().data] == ["tiny"]
    missing = httpx.get(url + "/v1/nothing")
    assert missing.status_code == 404 and "Not Found" in missing.json()["error"]["message"]
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["index"]["count"] == len(state.searcher.rows)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({}, 400, "'input' is required"),
        ({"input": []}, 400, "non-empty list"),
        ({"input": [[1, 2, 3]]}, 400, "token ids"),
        (
            {"input": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]},
            400,
            "fetches no URL",
        ),
        (
            {"input": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]},
            400,
            "not valid base64",
        ),
        (
            {"input": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]},
            400,
            "cannot be decoded",
        ),
        ({"input": [{"type": "audio"}]}, 400, "each part must be"),
        ({"input": ["x"] * 300}, 400, "at most 256"),
        ({"input": "x", "model": "gpt-4"}, 404, "not served here"),
        ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ],
)
def test_bad_embedding_requests_get_4xx(served, body, status, words):
    response = httpx.post(served[1] + "/v1/embeddings", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"]


def test_bad_chat_requests_and_limits(served, client):
    url = served[1]
    cases = [
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "last message must be the user's"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, "'max_tokens' must be in"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "not supported"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "'n' must be"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "must be a number"),
    ]
    for body, words in cases:
        response = httpx.post(url + "/v1/chat/completions", json=body)
        assert response.status_code == 400 and words in response.json()["error"]["message"], (
            body,
            response.text,
        )
    for raw in (b'"max_tokens": Infinity', b'"max_tokens": NaN', b'"temperature": -Infinity'):
        body = b'{"messages": [{"role": "user", "content": "hi"}], ' + raw + b"}"
        response = httpx.post(url + "/v1/chat/completions", content=body)
        assert response.status_code == 400 and "must be" in response.json()["error"]["message"], raw
    response = httpx.post(
        url + "/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "not JSON" in response.json()["error"]["message"]
    response = httpx.post(url + "/v1/embeddings", content=b"x" * (33 * 2**20))
    assert response.status_code == 413
    with pytest.raises(openai.BadRequestError, match="last message must be the user's"):
        client.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "hi"}])


def test_api_key_and_no_index(trained, monkeypatch, caplog):
    checkpoint, _ = trained
    monkeypatch.setenv("UNIMM_API_KEY", "s3cret")
    state = build_state(ServeOptions(model=str(checkpoint), name="tiny"))
    caplog.set_level(logging.INFO, logger="unimm.access")
    with Background(state) as url:
        assert httpx.get(url + "/health").status_code == 200  # open, for load balancers
        refused = httpx.get(url + "/v1/models", headers={"X-Request-ID": "no-key"})
        assert refused.status_code == 401 and refused.headers["x-request-id"] == "no-key"
        assert refused.json()["error"]["type"] == "authentication_error"
        lines = [r.getMessage() for r in caplog.records if r.name == "unimm.access"]
        assert "request_id=no-key method=GET path=/v1/models status=401" in lines[-1]
        metrics = httpx.get(url + "/metrics", headers={"authorization": "Bearer s3cret"}).text
        assert 'unimm_requests_total{route="/v1/models",status="401"} 1.0' in metrics
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        assert good.embeddings.create(model="tiny", input="x").data
        with pytest.raises(openai.AuthenticationError):
            bad.embeddings.create(model="tiny", input="x")
        with pytest.raises(openai.BadRequestError, match="needs an index"):
            good.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x"}], extra_body={"retrieval": True}
            )
        response = httpx.post(
            url + "/v1/search", json={"query": "x"}, headers={"authorization": "Bearer s3cret"}
        )
        assert response.status_code == 400 and "no index" in response.json()["error"]["message"]


def test_bench_serve_measures_both_sides(trained):
    """The bench starts `unimm serve` as its own process, loads it and stops it; each row has
    both sides' throughput, ordered percentiles and a ratio consistent with them, for every
    number of clients asked for."""
    from unimm.commands.bench_serve import bench_serve

    rows = bench_serve(str(trained[0]), requests=24, concurrency=[1, 4], chat_requests=4, max_tokens=2)
    assert [(r["what"].split(":")[0], r["concurrency"]) for r in rows] == [
        ("embeddings", 1),
        ("chat", 1),
        ("embeddings", 4),
        ("chat", 4),
    ]
    for row in rows:
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["ours_per_s"] > 0 and row["baseline_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["ours_per_s"] / row["baseline_per_s"], rel=0.05)


def test_a_scaled_random_checkpoint_serves_at_its_size(tmp_path):
    """`bench serve --hidden-size` serves the tiny LLaVA scaled up: a checkpoint the session
    loads, with the language model of the width and depth asked for."""
    from unimm.commands.bench_serve import scaled_checkpoint
    from unimm.data.samples import Sample, Slice
    from unimm.inference.session import Session

    folder = scaled_checkpoint(tmp_path, hidden_size=96, layers=3, embed_dim=32)
    session = Session.load(folder)
    text = session.model.mllm.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size) == (96, 3, 192)
    vectors = session.embed_views([Sample.of_slices([Slice.of_text("red circles")])])
    assert vectors.shape == (1, 32) and torch.allclose(vectors.norm(dim=-1), torch.ones(1))


@pytest.mark.parametrize("refill_ms", [0.0, 50.0])
def test_the_batcher_refills_to_the_last_batch_size(refill_ms):
    """Eight clients, each sending its next input 1 ms after its answer, against a model that
        takes 0.2 s a batch: taking what queued at once splits them into a batch of the first to come
        back and one of the rest, again and again; waiting (at most 20 ms, a tenth of a batch) for as
    many as the last batch had keeps them together once they are."""
    import asyncio
    import time as clock

    from unimm.data.samples import Sample, Slice
    from unimm.inference.server import EmbedBatcher

    def embed(samples):
        clock.sleep(0.2)
        return torch.zeros(len(samples), 4), [1] * len(samples)

    async def main():
        batcher = EmbedBatcher(embed, max_batch=32, wait_s=0.0, refill_s=refill_ms / 1e3)
        runner = asyncio.create_task(batcher.run())

        async def client(number):
            await asyncio.sleep(0.001 * number)  # they start together, a moment apart
            for _ in range(4):
                await batcher([Sample.of_slices([Slice.of_text("x")])])
                await asyncio.sleep(0.001)

        await asyncio.gather(*(client(n) for n in range(8)))
        runner.cancel()
        return list(batcher.batches)

    sizes = asyncio.run(main())
    assert sum(sizes) == 32
    if refill_ms:  # the first batches are whoever came first, then all eight together
        assert sizes[2:] == [8] * (len(sizes) - 2), sizes
    else:
        assert any(size < 8 for size in sizes[2:]), sizes
