"""Pair records (query, positive, hard negatives): formats, bad input, the pair loss against a
hand-computed InfoNCE (one process and 2 gloo processes), collation and training with them."""

from __future__ import annotations

import csv
import json
import math
import os
import sys

import pytest
import torch
from helpers import make_image, write_jsonl

from unimm.data.adapters import iter_records
from unimm.data.records import Record, record_to_obj
from unimm.errors import DataError


def _records(path, **kw) -> list:
    return list(iter_records(path, **kw))


PAIR = {
    "id": "q1",
    "query": [{"image": "imgs/0.jpg"}, {"text": "What colour is it?"}],
    "positive": [{"text": "red"}],
    "negatives": [[{"text": "blue"}], {"slices": [{"image": "imgs/1.jpg"}], "instruction": "Own text"}],
    "instruction": "vqa",
    "meta": {"from": "test"},
}


def test_a_unimm_pair_record_reads_and_round_trips(tmp_path):
    (record,) = _records(write_jsonl(tmp_path / "p.jsonl", [PAIR]))
    assert isinstance(record, Record)
    assert record.pair.counts == (2, 1, 1, 1)
    assert record.pair.instructions == (None, None, None, "Own text")
    assert [s.value for s in record.slices] == [
        "imgs/0.jpg",
        "What colour is it?",
        "red",
        "blue",
        "imgs/1.jpg",
    ]
    assert record.task == "discriminative" and record.instruction == "vqa"
    expected = {**PAIR, "negatives": [[{"text": "blue"}], PAIR["negatives"][1]]}
    assert record_to_obj(record) == expected


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"positive": None}, "without 'positive'"),
        ({"query": None}, "without 'query'"),
        ({"negatives": [[{"text": " red "}]]}, "negative 0 is identical to the positive"),
        ({"negatives": [{"text": "blue"}]}, "wrap a single negative"),
        ({"response": "x"}, "unknown key(s) 'response'"),
        ({"positive": {"slices": [{"text": "a"}], "instr": "x"}}, "positive: unknown key(s) ['instr']"),
        ({"negatives": [[{"text": ""}]]}, "negatives[0]: slice 0: 'text' is empty"),
    ],
)
def test_bad_pair_records_are_clear_errors_naming_the_record(tmp_path, change, message):
    row = {k: v for k, v in {**PAIR, **change}.items() if v is not None}
    (error,) = _records(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert isinstance(error, DataError)
    assert message in str(error) and "q1" in str(error) and "p.jsonl:1" in str(error)


MMEB_ROWS = [
    {
        "qry": "<|image_1|>\nRepresent the given image with the question: what is it?",
        "qry_image_path": "imgs/0.jpg",
        "pos_text": "a red square",
        "pos_image_path": "",
        "neg_text": "a blue square",
        "neg_image_path": "",
    },
    {
        "qry": "Find an image of: a blue circle",
        "qry_image_path": "",
        "pos_text": "<|image_1|> Represent the given image.",
        "pos_image_path": "imgs/1.jpg",
        "neg_text": "",
        "neg_image_path": "",
    },
]
MMEB_SLICES = [
    [
        ("image", "imgs/0.jpg"),
        ("text", "Represent the given image with the question: what is it?"),
        ("text", "a red square"),
        ("text", "a blue square"),
    ],
    [
        ("text", "Find an image of: a blue circle"),
        ("image", "imgs/1.jpg"),
        ("text", "Represent the given image."),
    ],
]


def _shape(record: Record) -> list:
    return [(s.kind, s.value) for s in record.slices]


def test_the_mmeb_training_layout_reads_from_jsonl_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "mmeb.jsonl", MMEB_ROWS)
    tsv = tmp_path / "mmeb.tsv"
    with tsv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(MMEB_ROWS[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(MMEB_ROWS)
    parquet = tmp_path / "mmeb.parquet"
    pq.write_table(pa.Table.from_pylist(MMEB_ROWS), parquet, row_group_size=1)
    for path in (jsonl, tsv, parquet):
        records = _records(path)
        assert [_shape(r) for r in records] == MMEB_SLICES, path
        assert [r.pair.counts for r in records] == [(2, 1, 1), (1, 2)]
        assert [r.line for r in records] == ([1, 2] if path != tsv else [2, 4])  # a quoted newline


def test_query_positive_negative_tables_with_image_columns(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text(
        "id,query,positive,negative,negative_2,negative_2_image\n"
        "a,two red circles,,,,\n"
        "b,one blue square,a blue square,a red square,,imgs/3.jpg\n"
        "c,x,same,same,,\n"
    )
    missing, good, same = _records(path)
    assert (
        isinstance(missing, DataError)
        and "without a positive" in str(missing)
        and "pairs.csv:2" in str(missing)
    )
    assert good.pair.counts == (1, 1, 1, 1) and _shape(good)[-1] == ("image", "imgs/3.jpg")
    assert isinstance(same, DataError) and "identical to the positive" in str(same)


# ---------------------------------------------------------------------------------------------
# The pair loss


def _hand_infonce(emb: torch.Tensor, pairs, tau: float) -> float:
    """−log(e^{q·p/τ} / Σ_c e^{q·c/τ}) over candidates = all positives + all negatives, by loops."""
    e = emb.double().tolist()
    candidates = [p for _, p, _ in pairs] + [n for _, _, ns in pairs for n in ns]
    total = 0.0
    for q, p, _ in pairs:
        dot = [sum(a * b for a, b in zip(e[q], e[c], strict=True)) / tau for c in candidates]
        positive = sum(a * b for a, b in zip(e[q], e[p], strict=True)) / tau
        total += -positive + math.log(sum(math.exp(d) for d in dot))
    return total / len(pairs)


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(
        torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1
    )


def test_the_pair_loss_is_infonce_over_in_batch_positives_and_hard_negatives():
    from unimm.training.losses import pair_loss

    emb = _unit(11, 8, 0)
    # rows 9 and 10 are views of ordinary samples: no candidates
    pairs = [(0, 1, [2, 3]), (4, 5, []), (6, 7, [8])]
    for tau in (0.02, 0.5):
        assert float(pair_loss(emb, pairs, tau)) == pytest.approx(_hand_infonce(emb, pairs, tau), rel=1e-5)
    # a hard negative that is the positive's twin halves the positive's share (log 2 more at τ → 0)
    twin = emb.clone()
    twin[2] = twin[1]
    assert float(pair_loss(twin, [(0, 1, [2])], 1e-3)) == pytest.approx(math.log(2), abs=1e-3)


def _pair_config(**train):
    from unimm.config import TrainConfig

    cfg = TrainConfig()
    cfg.train.alpha = 0.0
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


WORLD_PAIRS = [[(0, 1, [2]), (3, 4, [])], [(1, 2, [0, 3])]]  # per rank, local view rows
WORLD_ROWS = [5, 4]


def _global_pairs():
    out, offset = [], 0
    for pairs, rows in zip(WORLD_PAIRS, WORLD_ROWS, strict=True):
        out += [(q + offset, p + offset, [n + offset for n in ns]) for q, p, ns in pairs]
        offset += rows
    return out


def _gloo_worker(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist

    from unimm.training.step import _alignment

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["UNIMM_TEST_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        full = _unit(sum(WORLD_ROWS), 8, 1)
        start = sum(WORLD_ROWS[:rank])
        local = full[start : start + WORLD_ROWS[rank]].clone().requires_grad_()
        views = [(b, 0) for b in range(WORLD_ROWS[rank])]
        weighted, _, pair = _alignment(
            local, [None] * len(views), views, WORLD_PAIRS[rank], _pair_config(), True
        )
        (grad,) = torch.autograd.grad(weighted, local)
        torch.save({"pair": pair, "grad": grad}, f"{out}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def test_the_pair_loss_gathered_over_two_gloo_processes_equals_one_process(tmp_path):
    from unimm.training.losses import pair_loss

    os.environ.setdefault("UNIMM_TEST_PORT", str(29650 + os.getpid() % 500))
    torch.multiprocessing.spawn(_gloo_worker, args=(2, str(tmp_path)), nprocs=2)
    full = _unit(sum(WORLD_ROWS), 8, 1).requires_grad_()
    loss = pair_loss(full, _global_pairs(), 0.02)
    (grad,) = torch.autograd.grad(loss, full)
    assert float(loss.detach()) == pytest.approx(
        _hand_infonce(full.detach(), _global_pairs(), 0.02), rel=1e-5
    )
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["pair"] == pytest.approx(float(loss.detach()), rel=1e-6)
        start = sum(WORLD_ROWS[:rank])
        torch.testing.assert_close(got["grad"], grad[start : start + WORLD_ROWS[rank]], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Collation and training


@pytest.fixture(scope="module")
def tiny_model(trained):
    from unimm.inference.session import Session

    session = Session.load(trained[0], device="cpu")
    return session.model, session.processor


def _decoded(record: Record):
    from PIL import Image

    from unimm.data.samples import Sample, Slice

    slices = [
        Slice.of_text(s.value) if s.kind == "text" else Slice.of_image(Image.new("RGB", (32, 32), (9, 9, 9)))
        for s in record.slices
    ]
    return Sample(
        key=record.id,
        slices=slices,
        id=record.id,
        pair=record.pair,
        instruction_name=record.instruction,
        task=record.task,
    )


def test_collation_expands_pairs_with_instructions_and_chooses_negatives_per_epoch(tmp_path, tiny_model):
    from unimm.data.collate import Collator
    from unimm.data.pairs import expand_pairs

    model, processor = tiny_model
    rows = [
        {**PAIR, "id": f"q{i}", "negatives": [[{"text": f"neg {i} {k}"}] for k in range(4)]} for i in range(3)
    ]
    samples = [_decoded(r) for r in _records(write_jsonl(tmp_path / "p.jsonl", rows))]
    instructions = {"vqa": {"query": "Answer the question.", "document": "Represent the answer."}}
    collator = Collator.for_model(model, processor, instructions=instructions, hard_negatives=2, by_task=True)
    rows_of, sides = expand_pairs(samples, collator)
    assert len(rows_of) == 3 * 4 and sides == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert [rows_of[0].instruction, rows_of[1].instruction] == [
        "Answer the question.",
        "Represent the answer.",
    ]
    batch = collator(samples)
    assert len(batch["pairs"]) == 3 and batch["tasks"] == ["discriminative"] * 3
    for q, p, negatives in batch["pairs"]:  # each points at the last view of its row
        assert batch["views"][q][1] == len(batch["spans"][batch["views"][q][0]]) - 1
        assert batch["views"][p][0] == batch["views"][q][0] + 1 and len(negatives) == 2
    assert (batch["labels"] == -100).all()  # pairs train the alignment only
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert text.index("Answer the question.") < text.index("What colour")
    chosen = {
        epoch: [s.key for s in expand_pairs([x.replace(epoch=epoch) for x in samples], collator)[0]]
        for epoch in range(4)
    }
    assert chosen[0] == [s.key for s in rows_of]  # reproducible
    assert len({tuple(v) for v in chosen.values()}) > 1  # other negatives in other epochs


def _pair_data(tmp_path, count: int = 16):
    """Pair records over synthetic images: query = caption, positive = image, a hard negative."""
    from unimm.data.synthetic import write_synthetic

    data = write_synthetic(tmp_path / "synth", count, seed=3)
    captioned = [json.loads(line) for line in data.read_text().splitlines()]
    captioned = [r for r in captioned if [next(iter(s)) for s in r["slices"]] == ["image", "text"]]
    rows = []
    for i, record in enumerate(captioned):
        other = captioned[(i + 1) % len(captioned)]
        rows.append(
            {
                "id": f"pair-{i}",
                "query": [record["slices"][1]],
                "positive": [record["slices"][0]],
                "negatives": [[other["slices"][0]]],
                "instruction": "find",
            }
        )
    return write_jsonl(tmp_path / "synth" / "pairs.jsonl", rows), data


def test_training_mixes_pairs_and_records_and_grad_cache_matches(tmp_path, tiny_teachers):
    from helpers import config, metrics

    from unimm.commands.prepare import run as prepare
    from unimm.commands.train import run as train
    from unimm.config import PrepareConfig, build_config

    pairs, records = _pair_data(tmp_path)
    shards = {}
    for name, path in (("pairs", pairs), ("records", records)):
        options = {
            "prepare.inputs": [str(path)],
            "prepare.out": str(tmp_path / name),
            "prepare.image_size": 32,
            **{f"teachers.{k}": str(v) for k, v in tiny_teachers.items()},
        }
        prepare(build_config(PrepareConfig, options=options), progress=False)
        shards[name] = tmp_path / name
    manifest = json.loads((shards["pairs"] / "manifest.json").read_text())
    assert (
        manifest["instructions"] == ["find"] and manifest["counts"]["pairs"] == manifest["counts"]["samples"]
    )
    base = [
        f"data.train=[{shards['pairs']},{shards['records']}]",
        "data.weights=[1,1]",
        "model.instructions={find: {query: 'Find the image.', document: 'An image.'}}",
        "train.max_steps=2",
        "train.save_every=2",
        "train.batch_size=4",
    ]
    runs = {}
    for name, extra in (("whole", []), ("cached", ["train.grad_cache_chunk=2"])):
        cfg = config(tmp_path / name, shards["pairs"], *base, *extra)
        train(cfg, progress=False)
        runs[name] = metrics(tmp_path / name)
    assert all("loss_pair" in m and m["loss_pair"] > 0 for m in runs["whole"])
    for a, b in zip(runs["whole"], runs["cached"], strict=True):
        assert b["loss_pair"] == pytest.approx(a["loss_pair"], rel=1e-4)
        assert b["loss_disc"] == pytest.approx(a["loss_disc"], rel=1e-4)
    # at alpha = 0 the pair loss alone trains the retrieval side (and needs the views all the same)
    train(config(tmp_path / "alpha0", shards["pairs"], *base, "train.alpha=0"), progress=False)
    assert all(m["loss_pair"] > 0 and m["loss_disc"] == 0 for m in metrics(tmp_path / "alpha0"))
    meta = json.loads((tmp_path / "whole" / "step-000002" / "unimm.json").read_text())
    assert meta["inference"]["instructions"] == {
        "find": {"query": "Find the image.", "document": "An image."}
    }
    # a record naming a task the recipe lacks: refused before training, naming it
    from unimm.errors import UnimmError

    with pytest.raises(UnimmError, match=r"instruction task .find. is not in model\.instructions"):
        train(config(tmp_path / "none", shards["pairs"], "train.max_steps=1"), progress=False)


def test_prepare_refuses_generative_pairs_and_embed_refuses_pair_files(tmp_path):
    make_image(tmp_path / "imgs" / "0.jpg")
    make_image(tmp_path / "imgs" / "1.jpg")
    from unimm.commands.prepare import run as prepare
    from unimm.config import PrepareConfig, build_config
    from unimm.errors import UnimmError

    path = write_jsonl(tmp_path / "p.jsonl", [PAIR])
    options = {
        "prepare.inputs": [str(path)],
        "prepare.out": str(tmp_path / "out"),
        "prepare.task": "generative",
    }
    with pytest.raises(UnimmError, match="pairs train the alignment only"):
        prepare(build_config(PrepareConfig, options=options), progress=False)


def test_embed_refuses_a_pair_file_naming_the_record(tmp_path, trained):
    from typer.testing import CliRunner

    from unimm.cli import app

    path = tmp_path / "pairs.csv"
    path.write_text("id,query,positive\nx,two red circles,a red circle\n")
    args = ["embed", "--model", str(trained[0]), "--data", str(path), "--out", str(tmp_path / "ix"), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "pairs.csv:2: record 'x' is a pair record" in result.output
    assert not list((tmp_path / "ix").glob("*"))  # nothing written
