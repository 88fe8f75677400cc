"""`unimm index build` a part at a time: the same index as FAISS's in-memory build, resumable
after an interruption or a SIGKILL, searched mapped from its file; rows read when found."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from unimm.commands.bench_index import synthetic_queries, write_synthetic_index
from unimm.config import IndexOptions
from unimm.data.synthetic import clustered_unit_parts
from unimm.errors import UnimmError
from unimm.inference import ann_build
from unimm.inference.ann import open_ann, read_ann_manifest, search_ann
from unimm.inference.ann_build import build_ann, faiss_index
from unimm.inference.store import IndexRows, MappedVectors, load_rows, part_embeddings, read_manifest

faiss = pytest.importorskip("faiss")

DOCS, DIM, PART = 12_000, 32, 1000
OPTIONS = {"backend": "faiss-ivfpq", "nlist": 16, "pq_m": 8, "nprobe": 4}


@pytest.fixture
def index(tmp_path):
    folder = tmp_path / "index"
    write_synthetic_index(folder, DOCS, DIM, part_size=PART, seed=3)
    return folder


def _all_vectors(n=DOCS, dim=DIM, part=PART, seed=3):
    return np.concatenate(list(clustered_unit_parts(n, dim, part_size=part, seed=seed)))


def _search(index, k=10):
    queries = synthetic_queries(64, index.d, docs=DOCS, part_size=PART, seed=3).numpy()
    return index.search(queries, k)


def _ids(index) -> list[int]:
    """Every id held in the IVF index's lists (each vector once, if none was lost or doubled)."""
    lists = faiss.extract_index_ivf(index).invlists
    out: list[int] = []
    for number in range(lists.nlist):
        size = lists.list_size(number)
        if size:
            out += faiss.rev_swig_ptr(lists.get_ids(number), size).tolist()
    return sorted(out)


def test_a_part_at_a_time_is_faiss_in_memory_and_mapped(index):
    """Trained on the same sample, filled part by part: the very index FAISS builds from all the
    vectors at once (same scores and rows); opened for search, its lists are mapped, not read."""
    ann = build_ann(IndexOptions(index=str(index), **OPTIONS), progress=False)
    want, _ = faiss_index(_all_vectors(), IndexOptions(**OPTIONS))
    mapped = open_ann(index, ann, mapped=True)
    assert isinstance(faiss.downcast_InvertedLists(mapped.invlists), faiss.OnDiskInvertedLists)
    got_scores, got_rows = _search(mapped)
    want_scores, want_rows = _search(want)
    np.testing.assert_array_equal(got_rows, want_rows)
    np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=1e-6)
    assert ann["count"] == DOCS and ann["bytes"] == (index / "ann" / ann["file"]).stat().st_size
    assert not list((index / "ann").glob(".partial*"))  # nothing left of the build


def test_an_interrupted_build_resumes_where_it_stopped(index, monkeypatch):
    """Killed after its second checkpoint (6 parts) it resumes with part 7, reads only the 6 parts
    left, and ends with the same index as an uninterrupted build: nothing lost, nothing twice."""
    opts = IndexOptions(index=str(index), checkpoint_every=3 * PART, **OPTIONS)
    real, calls = ann_build.part_vectors, []

    def interrupted(folder, part):
        calls.append(part["name"])
        if len(calls) == 8:  # the fill's 8th part (the training sample reads rows mapped, not parts)
            raise KeyboardInterrupt
        return real(folder, part)

    monkeypatch.setattr(ann_build, "part_vectors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_ann(opts, progress=False)
    journal = json.loads((index / "ann" / ".partial.json").read_text())
    assert journal["parts_done"] == 6 and read_ann_manifest(index) is None
    calls.clear()
    monkeypatch.setattr(ann_build, "part_vectors", lambda f, p: (calls.append(p["name"]), real(f, p))[1])
    ann = build_ann(IndexOptions(index=str(index), resume=True, **OPTIONS), progress=False)
    assert calls == [f"embeddings-{n:05d}" for n in range(6, 12)]
    resumed = open_ann(index, ann, mapped=False)
    assert resumed.ntotal == DOCS and _ids(resumed) == list(range(DOCS))
    want, _ = faiss_index(_all_vectors(), IndexOptions(**OPTIONS))
    np.testing.assert_array_equal(_search(resumed)[1], _search(want)[1])
    assert not (index / "ann" / ".partial.json").exists()


def test_resume_refuses_other_options_and_a_plain_build_starts_over(index, monkeypatch):
    opts = IndexOptions(index=str(index), checkpoint_every=2 * PART, **OPTIONS)
    real, calls = ann_build.part_vectors, []

    def interrupted(folder, part):
        calls.append(1)
        if len(calls) == 5:  # the fill's 5th part
            raise KeyboardInterrupt
        return real(folder, part)

    monkeypatch.setattr(ann_build, "part_vectors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_ann(opts, progress=False)
    monkeypatch.setattr(ann_build, "part_vectors", real)
    other = IndexOptions(index=str(index), resume=True, **(OPTIONS | {"nlist": 32}))
    with pytest.raises(UnimmError, match=r"nlist = 16 \(now 32\)"):
        build_ann(other, progress=False)
    assert (index / "ann" / ".partial.json").is_file()  # the refused resume kept it
    ann = build_ann(IndexOptions(index=str(index), **(OPTIONS | {"nlist": 32})), progress=False)
    assert ann["params"]["nlist"] == 32 and ann["count"] == DOCS
    assert not list((index / "ann").glob(".partial*"))
    again = build_ann(IndexOptions(index=str(index), resume=True, **OPTIONS), progress=False)
    assert again["count"] == DOCS  # --resume with nothing to resume builds from the start


def test_sigkill_during_build_then_resume_loses_and_doubles_nothing(tmp_path):
    """A real `unimm index build` killed with SIGKILL once it has saved a checkpoint; `--resume`
    ends with each vector once, encoded as a fresh fill of the same trained index encodes it."""
    folder, n = tmp_path / "big", 200_000
    write_synthetic_index(folder, n, 64, part_size=2000, seed=5)
    command = [sys.executable, "-m", "unimm.cli", "index", "build", "--index", str(folder)]
    command += ["--backend", "faiss-ivfpq", "--nlist", "64", "--pq-m", "16", "-q"]
    child = subprocess.Popen([*command, "--set", "index.checkpoint_every=10000"], stderr=subprocess.PIPE)
    journal = folder / "ann" / ".partial.json"
    deadline = time.monotonic() + 120
    while not journal.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read()
    done = json.loads(journal.read_text())["parts_done"]
    assert 0 < done < 100 and read_ann_manifest(folder) is None
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    index = open_ann(folder, read_ann_manifest(folder), mapped=False)
    assert index.ntotal == n and _ids(index) == list(range(n))
    fresh = faiss.clone_index(index)
    fresh.reset()
    fresh.add(np.concatenate(list(clustered_unit_parts(n, 64, part_size=2000, seed=5))))
    queries = synthetic_queries(64, 64, docs=n, part_size=2000, seed=5).numpy()
    np.testing.assert_array_equal(index.search(queries, 10)[1], fresh.search(queries, 10)[1])


def test_rows_are_read_a_part_at_a_time(index):
    manifest = read_manifest(index)
    rows, every = IndexRows(index, manifest, keep=2), load_rows(index, manifest)
    assert len(rows) == DOCS and list(rows) == every
    assert rows[0]["id"] == "doc-00000000" and rows[-1] == every[-1] and rows[4999] == every[4999]
    assert rows[998:1002] == every[998:1002]  # across a part boundary
    assert rows.part.cache_info().currsize <= 2
    with pytest.raises(IndexError):
        rows[DOCS]


def _stored(index) -> torch.Tensor:
    """Every stored vector, read whole by the safetensors library (the oracle of the mapped reads)."""
    return torch.cat([part_embeddings(index, part) for part in read_manifest(index)["parts"]])


def test_mapped_vectors_are_the_stored_ones(index):
    stored, mapped = _stored(index), MappedVectors(index, read_manifest(index))
    rows = torch.randint(0, DOCS, (7, 33), generator=torch.Generator().manual_seed(0)).numpy()
    assert torch.equal(mapped.gather(rows), stored[torch.from_numpy(rows)])
    assert mapped.gather(np.zeros(0, dtype=np.int64)).shape == (0, DIM)
    (index / "embeddings-00003.safetensors").write_bytes(b"\x08")  # truncated
    with pytest.raises(UnimmError, match=r"embeddings-00003\.safetensors: not a readable part"):
        MappedVectors(index, read_manifest(index)).gather(np.array([3 * PART]))


def test_rerank_rescores_the_candidates_with_the_stored_vectors(index):
    """IVF-PQ's candidates re-scored from the stored vectors: with every vector a candidate it is
    exact search (scores and rows); with 4·k (the default) its recall@10 beats the codes' own."""
    from unimm.inference.search import exact_search

    ann = build_ann(IndexOptions(index=str(index), **OPTIONS), progress=False)
    assert ann["params"]["rerank"] == 4  # the default
    mapped, stored = open_ann(index, ann, mapped=True), MappedVectors(index, read_manifest(index))
    queries = synthetic_queries(64, DIM, docs=DOCS, part_size=PART, seed=3)
    want_scores, want_rows = exact_search(queries, _stored(index), 10)
    mapped.nprobe = OPTIONS["nlist"]
    scores, rows = search_ann(mapped, queries, 10, stored, rerank=DOCS // 10)
    torch.testing.assert_close(scores, want_scores, rtol=0, atol=1e-5)
    assert (rows == want_rows).float().mean() > 0.99  # rows may swap only among equal scores
    mapped.nprobe = OPTIONS["nprobe"]

    def recall(rerank):
        _, found = search_ann(mapped, queries, 10, stored, rerank=rerank)
        return (
            sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), want_rows.tolist(), strict=True)) / 640
        )

    print("recall@10 codes", recall(0), "re-ranked 4k", recall(4))
    assert recall(4) > recall(0) + 0.1
