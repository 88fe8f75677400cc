"""`unimm serve` as an operator and an OpenAI client see it: the vision message format (data
URLs; remote URLs only when allowed), one search result shape with the document's text and
metadata, the OpenAPI page, Prometheus metrics read back with prometheus_client's own parser,
and one access-log line per request carrying its request id."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import logging
import threading

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

from PIL import Image  # noqa: E402

from unimm.config import ServeOptions  # noqa: E402
from unimm.data.samples import Sample, Slice  # noqa: E402
from unimm.inference.serving import Background, build_state  # noqa: E402


def png_bytes(colour=(200, 30, 30), size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


class _ImageHost(http.server.SimpleHTTPRequestHandler):
    """Files, plus a redirect to a file: URL (which must never be followed)."""

    def do_GET(self):
        if self.path == "/to-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    """A local HTTP server with a PNG (``/red.png``), a text file and a redirect, standing in
    for a remote image host."""
    root = tmp_path_factory.mktemp("www")
    (root / "red.png").write_bytes(png_bytes())
    (root / "notes.txt").write_text("not an image")
    handler = functools.partial(_ImageHost, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def metric_samples(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in prometheus_parser.text_string_to_metric_families(text)
        for s in family.samples
    }


def test_vision_messages_remote_images_and_one_search_shape(trained, tiny_shards, image_server):
    """The OpenAI vision format answers as the session does on the same image; a remote URL is
    refused, naming the flag, unless the server was started with it (then it equals the data
    URL); search results carry the document's text, image count, metadata and source."""
    from unimm.data.shards import read_samples

    checkpoint, index = trained
    image = png_bytes()
    parts = [
        {"type": "image_url", "image_url": {"url": data_url(image)}},
        {"type": "text", "text": "Which colour?"},
    ]
    state = build_state(ServeOptions(model=str(checkpoint), index=str(index), name="tiny"))
    with Background(state) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=6
        )
        sample = Sample.of_slices(
            [Slice.of_image(Image.open(io.BytesIO(image)).convert("RGB")), Slice.of_text("Which colour?")]
        )
        assert answer.choices[0].message.content == state.session.generate([sample], max_new_tokens=6)[0]
        remote = [{"type": "image_url", "image_url": {"url": image_server + "/red.png"}}]
        with pytest.raises(openai.BadRequestError, match="--allow-remote-images"):
            client.embeddings.create(model="tiny", input=[remote])

        found = httpx.post(url + "/v1/search", json={"query": "red circles", "top_k": 3}).json()
        documents = {s.id: s for s in read_samples(tiny_shards, split_by_node=False, split_by_worker=False)}
        for result in found["data"][0]["results"]:
            assert set(result) == {"id", "score", "text", "images", "metadata", "source"}
            want = documents[result["id"]]
            assert result["text"] == "\n".join(s.text for s in want.slices if s.kind == "text")
            assert result["images"] == sum(s.kind == "image" for s in want.slices) > 0
            assert result["source"] == {"file": want.source["file"], "line": want.source["line"]}
        rag = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "red?"}],
            max_tokens=2,
            extra_body={"retrieval": True},
        )
        assert all(
            set(r) == {"id", "score", "text", "images", "metadata", "source"}
            for r in rag.model_extra["retrieved"]
        )

    public_only = build_state(ServeOptions(model=str(checkpoint), name="tiny", allow_remote_images=True))
    with Background(public_only) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(
            openai.BadRequestError, match=r"is at 127\.0\.0\.1, not a public address.*allow_private"
        ):
            client.embeddings.create(model="tiny", input=[remote])

    options = {"allow_remote_images": True, "allow_private_image_hosts": True}
    allowed = build_state(ServeOptions(model=str(checkpoint), name="tiny", **options))
    with Background(allowed) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def fetch(path: str):
            part = {"type": "image_url", "image_url": {"url": image_server + path}}
            return client.embeddings.create(model="tiny", input=[[part]], encoding_format="float")

        with pytest.raises(
            openai.BadRequestError, match="Redirection to url 'file:///etc/passwd' is not allowed"
        ):
            fetch("/to-file")
        with pytest.raises(openai.BadRequestError, match="the URL gives text/plain, not an image"):
            fetch("/notes.txt")
        fetched = (
            client.embeddings.create(model="tiny", input=[remote], encoding_format="float").data[0].embedding
        )
        inline = [{"type": "image_url", "image_url": {"url": data_url(image)}}]
        want = (
            client.embeddings.create(model="tiny", input=[inline], encoding_format="float").data[0].embedding
        )
        torch.testing.assert_close(torch.tensor(fetched), torch.tensor(want))
        with pytest.raises(openai.BadRequestError, match="cannot be fetched"):
            client.embeddings.create(
                model="tiny",
                input=[[{"type": "image_url", "image_url": {"url": image_server + "/gone.png"}}]],
            )
        local_file = [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]
        with pytest.raises(openai.BadRequestError, match="inline data URLs"):
            client.embeddings.create(model="tiny", input=[local_file])


def test_search_results_of_a_record_index_have_the_same_shape(tmp_path, trained, unimm_records):
    from unimm.commands.embed import run as embed
    from unimm.config import EmbedConfig, build_config

    rows = [json.loads(line) for line in unimm_records.read_text().splitlines()]
    for n, row in enumerate(rows):
        row["meta"] = {"url": f"https://example.org/{n}"}
    unimm_records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = {
        "embed.model": str(trained[0]),
        "embed.data": [str(unimm_records)],
        "embed.out": str(tmp_path / "i"),
    }
    embed(build_config(EmbedConfig, options=options), progress=False)
    state = build_state(ServeOptions(model=str(trained[0]), index=str(tmp_path / "i"), name="tiny"))
    with Background(state) as url:
        found = httpx.post(url + "/v1/search", json={"query": "colour 3", "top_k": 12}).json()
    results = found["data"][0]["results"]
    assert len(results) == 12
    for result in results:
        line = int(result["id"][1:]) + 1
        record = rows[line - 1]
        assert result["source"] == {"file": "data.jsonl", "line": line}
        assert result["text"] == "\n".join(s["text"] for s in record["slices"] if "text" in s)
        assert result["images"] == sum("image" in s for s in record["slices"])
        assert result["metadata"] == record["meta"]


def test_openapi_metrics_and_access_log(trained, caplog):
    """Every example in the OpenAPI page is a request the server accepts; the metrics count
    exactly the requests made (by route and status), the embedding batches and the errors; each
    request logs one line with its id, which the response echoes."""
    checkpoint, index = trained
    state = build_state(ServeOptions(model=str(checkpoint), index=str(index), name="tiny"))
    caplog.set_level(logging.INFO, logger="unimm.access")
    with Background(state) as url:
        spec = httpx.get(url + "/openapi.json").json()
        assert httpx.get(url + "/docs").status_code == 200
        for path in ("/v1/embeddings", "/v1/search", "/v1/chat/completions"):
            schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
            assert schema["required"] and schema["properties"]
            response = httpx.post(url + path, json=schema["example"])
            assert response.status_code == 200, (path, response.text)
        caplog.clear()
        for n in range(3):
            response = httpx.post(
                url + "/v1/embeddings", json={"input": f"doc {n}"}, headers={"X-Request-ID": f"trace-{n}"}
            )
            assert response.headers["x-request-id"] == f"trace-{n}"
        bad = httpx.post(url + "/v1/embeddings", json={"input": []}, headers={"X-Request-ID": "bad one!"})
        assert bad.status_code == 400 and bad.headers["x-request-id"].startswith("req-")
        httpx.get(url + "/no/such/route")
        lines = [r.getMessage() for r in caplog.records if r.name == "unimm.access"]
        assert [line.split()[0] for line in lines[:3]] == [f"request_id=trace-{n}" for n in range(3)]
        assert "path=/v1/embeddings status=400" in lines[3] and "path=/no/such/route status=404" in lines[4]
        assert len(lines) == 5
        samples = metric_samples(url)
    requests = "unimm_requests_total"
    assert samples[(requests, (("route", "/v1/embeddings"), ("status", "200")))] == 1 + 3
    assert samples[(requests, (("route", "/v1/embeddings"), ("status", "400")))] == 1
    assert samples[(requests, (("route", "other"), ("status", "404")))] == 1
    assert (
        samples[
            ("unimm_request_errors_total", (("route", "/v1/embeddings"), ("type", "invalid_request_error")))
        ]
        == 1
    )
    assert samples[("unimm_request_duration_seconds_count", (("route", "/v1/search"),))] == 1
    # embedding passes: the example's 2 inputs, 3 single inputs, the search query, the chat's none
    assert samples[("unimm_embedding_batch_size_count", ())] == 5
    assert samples[("unimm_embedded_inputs_total", ())] == 2 + 3 + 1
    assert samples[("unimm_prompt_tokens_total", ())] > 0 and ("unimm_generated_tokens_total", ()) in samples


def test_remote_fetch_refuses_what_it_must():
    """Every hop is checked: other schemes, and hosts at loopback, private or link-local
    addresses (cloud metadata), unless private hosts are allowed."""
    import urllib.request

    from unimm.inference.fetch import FetchRefused, _CheckedRedirects, check_url

    for url in (
        "ftp://example.org/a.png",
        "file:///etc/passwd",
        "http://127.0.0.1/a.png",
        "http://[::1]/a.png",
        "http://10.1.2.3/a.png",
        "http://169.254.169.254/latest/meta-data",
    ):
        with pytest.raises(FetchRefused):
            check_url(url, private_hosts=False)
    check_url("http://127.0.0.1/a.png", private_hosts=True)
    with pytest.raises(FetchRefused, match="only http"):
        check_url("gopher://127.0.0.1/", private_hosts=True)
    request = urllib.request.Request("http://93.184.216.34/a.png")
    with pytest.raises(FetchRefused, match=r"169\.254\.169\.254, not a public address"):
        _CheckedRedirects(False).redirect_request(request, None, 302, "Found", {}, "http://169.254.169.254/x")
