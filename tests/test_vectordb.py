"""`unimm index push` and search through Qdrant (its embedded mode, the client a server uses):
results equal the index's exact search, filters equal a brute-force search of the matching
documents, a re-push changes nothing, a push killed half-way (in-process, and by a real
SIGKILL) resumes without losing or duplicating a document, and bad input is refused with
nothing written."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("qdrant_client")

from unimm.config import RetrieveConfig, build_config
from unimm.data.samples import Sample, Slice
from unimm.errors import UnimmError
from unimm.inference import vectordb
from unimm.inference.ann import Searcher
from unimm.inference.session import Session
from unimm.inference.store import load_index

QUERIES = ["red circles", "a blue square", "two shapes", "green"]


def queries(session) -> torch.Tensor:
    return session.embed_views([Sample.of_slices([Slice.of_text(q)]) for q in QUERIES], role="query")


def test_database_search_equals_exact_search(tmp_path, trained):
    checkpoint, index = trained
    db = str(tmp_path / "db")
    result = vectordb.push(str(index), db, "docs", batch_size=3)
    _, rows, _ = load_index(index)
    assert result == {"pushed": len(rows), "skipped": 0, "count": len(rows)}
    session = Session.load(checkpoint)
    vectors = queries(session)
    exact = Searcher.for_session(index, session, checkpoint, "exact")
    through = vectordb.DatabaseSearcher(
        db, "docs", model=str(checkpoint), instruction=session.task, filters={}
    )
    try:
        for want, got in zip(exact.search(vectors, 5), through.search(vectors, 5), strict=True):
            assert [exact.rows[r]["id"] for r, _ in want] == [through.rows[r]["id"] for r, _ in got]
            assert [s for _, s in got] == pytest.approx([s for _, s in want], rel=1e-5, abs=1e-6)
    finally:
        through.close()
    # the retrieve command gives the same ranking through --db as through --index
    from unimm.commands.retrieve import run

    def retrieve(**where):
        options = {"retrieve.model": str(checkpoint), "retrieve.query": [["text", "red circles"]], **where}
        return run(build_config(RetrieveConfig, options=options))["results"][0]["ids"]

    assert retrieve(**{"retrieve.db": db, "retrieve.collection": "docs"}) == retrieve(
        **{"retrieve.index": str(index)}
    )
    again = vectordb.push(str(index), db, "docs", batch_size=3)
    assert again["count"] == len(rows)  # a re-push adds nothing
    assert vectordb.push(str(index), db, "docs", batch_size=3, resume=True) == {
        "pushed": 0,
        "skipped": len(rows),
        "count": len(rows),
    }


def test_filters_equal_a_search_of_the_matching_documents(tmp_path, trained, unimm_records):
    from unimm.commands.embed import run as embed
    from unimm.config import EmbedConfig

    rows = [json.loads(line) for line in unimm_records.read_text().splitlines()]
    for n, row in enumerate(rows):
        row["meta"] = {"lang": "en" if n % 3 else "fr", "year": 2020 + n % 2}
    unimm_records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = tmp_path / "i"
    options = {"embed.model": str(trained[0]), "embed.data": [str(unimm_records)], "embed.out": str(index)}
    embed(build_config(EmbedConfig, options=options | {"embed.dtype": "float32"}), progress=False)
    db = str(tmp_path / "db")
    vectordb.push(str(index), db, "docs")
    session = Session.load(trained[0])
    vectors = queries(session)
    stored, index_rows, _ = load_index(index)
    want_rows = [
        n for n, r in enumerate(index_rows) if r["meta"]["lang"] == "en" and r["meta"]["year"] == 2021
    ]
    scores = vectors @ stored[want_rows].T
    searcher = vectordb.DatabaseSearcher(
        db,
        "docs",
        model=str(trained[0]),
        instruction=session.task,
        filters=vectordb.parse_filter(["lang=en", "year=2021"]),
    )
    try:
        found = searcher.search(vectors, 3)
        for q, hits in enumerate(found):
            best = torch.topk(scores[q], 3).indices.tolist()
            assert [searcher.rows[r]["id"] for r, _ in hits] == [index_rows[want_rows[b]]["id"] for b in best]
        with pytest.raises(UnimmError, match=r"--db .* is open elsewhere"):
            vectordb.DatabaseSearcher(db, "docs", model=str(trained[0]), instruction=None, filters={})
    finally:
        searcher.close()
    unknown = r"--filter colour: no document has that metadata field \(fields: lang, year\)"
    with pytest.raises(UnimmError, match=unknown):
        vectordb.DatabaseSearcher(
            db, "docs", model=str(trained[0]), instruction=None, filters={"colour": "red"}
        )


def test_a_push_killed_half_way_resumes_without_loss_or_duplicates(tmp_path, trained, monkeypatch):
    _, index = trained
    stored, rows, _ = load_index(index)
    db = str(tmp_path / "db")
    real_connect, calls = vectordb.connect, {"n": 0}

    def dying(url):
        client = real_connect(url)
        upsert = client.upsert

        def upsert_then_die(collection, points, wait):
            if collection == "docs":
                calls["n"] += 1
                if calls["n"] == 3:
                    raise KeyboardInterrupt  # killed during the third batch
            return upsert(collection, points=points, wait=wait)

        client.upsert = upsert_then_die
        return client

    monkeypatch.setattr(vectordb, "connect", dying)
    with pytest.raises(KeyboardInterrupt):
        vectordb.push(str(index), db, "docs", batch_size=4)
    monkeypatch.setattr(vectordb, "connect", real_connect)
    from unimm.inference.documents import document_view

    def fields(of_rows):
        return sorted(set().union(*(document_view(r, [])["metadata"] for r in of_rows)))

    client = real_connect(db)
    try:  # what is in is filterable, though the push stopped
        assert vectordb.read_card(client, "docs")["fields"] == fields(rows[:8])
    finally:
        client.close()
    result = vectordb.push(str(index), db, "docs", batch_size=4, resume=True)
    assert result == {"pushed": len(rows) - 8, "skipped": 8, "count": len(rows)}
    client = real_connect(db)
    try:
        points = client.retrieve("docs", ids=[vectordb.point_id(r["id"]) for r in rows], with_vectors=True)
        by_id = {p.payload["id"]: p for p in points}
        assert sorted(by_id) == sorted(r["id"] for r in rows)
        assert vectordb.read_card(client, "docs")["fields"] == fields(rows) != []
        for n, row in enumerate(rows):
            assert by_id[row["id"]].vector == pytest.approx(stored[n].tolist(), rel=1e-6)
            assert by_id[row["id"]].payload["row"] == row
    finally:
        client.close()


def test_sigkill_during_push_then_resume_loses_and_doubles_nothing(tmp_path):
    """A real `unimm index push` killed with SIGKILL part-way (the embedded database commits each
    point as it goes); `--resume` skips the batches that are in, and the collection ends with
    every document exactly once, each with its stored vector."""
    from unimm.commands.bench_index import write_synthetic_index

    folder, db, n = tmp_path / "synthetic", tmp_path / "db", 6000
    write_synthetic_index(folder, n, 16, part_size=1000, seed=2)
    command = [sys.executable, "-m", "unimm.cli", "index", "push", "--index", str(folder), "--db", str(db)]
    command += ["--collection", "docs", "--batch-size", "50", "-q"]
    child = subprocess.Popen(command, stderr=subprocess.PIPE)
    storage = db / "collection" / "docs" / "storage.sqlite"  # the embedded engine's own file
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        if storage.exists() and storage.stat().st_size > 256 * 1024:  # some hundreds of points in
            break
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read()
    client = vectordb.connect(str(db))
    try:
        before = client.count("docs").count
    finally:
        client.close()
    assert 0 < before < n
    resumed = subprocess.run([*command[:-1], "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    pushed, skipped = map(
        int, re.search(r"pushed (\d+) document\(s\) \((\d+) already", resumed.stdout).groups()
    )
    assert pushed + skipped == n and skipped >= before - 50 and skipped % 50 == 0  # whole batches skipped
    stored, rows, _ = load_index(folder)
    client = vectordb.connect(str(db))
    try:
        assert client.count("docs").count == n
        points = client.retrieve("docs", ids=[vectordb.point_id(r["id"]) for r in rows], with_vectors=True)
        assert sorted(p.payload["id"] for p in points) == [r["id"] for r in rows]
        by_id = {p.payload["id"]: p.vector for p in points}
        for row, vector in zip(rows, stored, strict=True):
            assert by_id[row["id"]] == pytest.approx(vector.tolist(), rel=1e-6)
    finally:
        client.close()


def test_bad_pushes_and_databases(tmp_path, trained):
    checkpoint, index = trained
    db = str(tmp_path / "db")
    vectordb.push(str(index), db, "docs")
    other = tmp_path / "other-index"
    shutil.copytree(index, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["model_hash"], manifest["model"] = "0" * 64, "/elsewhere/step-000009"
    (other / "manifest.json").write_text(json.dumps(manifest))
    _, rows, _ = load_index(index)
    with pytest.raises(
        UnimmError, match=r"--collection docs holds \d+-d vectors of model .*push it to another --collection"
    ):
        vectordb.push(str(other), db, "docs")
    client = vectordb.connect(db)
    try:
        assert client.count("docs").count == len(rows)  # nothing was written
    finally:
        client.close()
    with pytest.raises(UnimmError, match=r"--db http://127\.0\.0\.1:9: cannot reach the Qdrant server"):
        vectordb.push(str(index), "http://127.0.0.1:9", "docs")
    with pytest.raises(UnimmError, match="no such collection"):
        vectordb.DatabaseSearcher(db, "nope", model=str(checkpoint), instruction=None, filters={})
    with pytest.raises(UnimmError, match="--filter lang: give KEY=VALUE"):
        vectordb.parse_filter(["lang"])


def test_chat_and_serve_search_through_the_database(tmp_path, trained):
    """`chat --db` retrieves and answers as `chat --index`; `serve --db` finds, shapes and counts
    what `serve --index` does (/v1/search, /health)."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx2")
    from unimm.config import ChatOptions, ServeOptions
    from unimm.inference.chat import ChatSession
    from unimm.inference.serving import Background, build_state

    checkpoint, index = trained
    db = str(tmp_path / "db")
    vectordb.push(str(index), db, "docs")
    question = [Slice.of_text("Which shapes are red?")]
    by_index = ChatSession(ChatOptions(model=str(checkpoint), index=str(index), top_k=2, max_new_tokens=4))
    by_db = ChatSession(
        ChatOptions(model=str(checkpoint), db=db, collection="docs", top_k=2, max_new_tokens=4)
    )
    try:
        assert by_db.answer(question) == by_index.answer(question)
        assert by_db.last_retrieved == by_index.last_retrieved and len(by_db.last_retrieved) == 2
    finally:
        by_db.searcher.close()
    found = {}
    for name, where in (("index", {"index": str(index)}), ("db", {"db": db, "collection": "docs"})):
        state = build_state(ServeOptions(model=str(checkpoint), name="tiny", **where))
        try:
            with Background(state) as url:
                found[name] = httpx.post(url + "/v1/search", json={"query": "red circles", "top_k": 3}).json()
                found[name + "/health"] = httpx.get(url + "/health").json()["index"]
                first = found[name]["data"][0]["results"][0]["metadata"]
                key, value = next((k, v) for k, v in first.items() if isinstance(v, (str, int)))
                body = {"query": "red circles", "top_k": 5, "filter": {key: value}}
                filtered = httpx.post(url + "/v1/search", json=body)
                if name == "index":  # an index folder has no filters
                    assert filtered.status_code == 400 and "unimm serve --db" in filtered.text
                    continue
                results = filtered.json()["data"][0]["results"]
                assert results and all(r["metadata"][key] == value for r in results)
                unknown = httpx.post(url + "/v1/search", json={"query": "x", "filter": {"colour": "red"}})
                assert (
                    unknown.status_code == 400
                    and "colour: no document has that metadata field" in unknown.text
                )
        finally:
            if name == "db":
                state.searcher.close()
    drop = lambda results: [{k: v for k, v in r.items() if k != "score"} for r in results]  # noqa: E731
    assert drop(found["db"]["data"][0]["results"]) == drop(found["index"]["data"][0]["results"])
    assert found["db/health"] == {"count": found["index/health"]["count"], "backend": "qdrant"}
