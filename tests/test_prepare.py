"""`unimm prepare`: round trips for every format, determinism, resume, teachers, bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from helpers import COLOURS, make_image, write_jsonl
from PIL import Image

from unimm.commands.prepare import run
from unimm.config import PrepareConfig, build_config
from unimm.data.adapters import iter_records
from unimm.data.images import target_size
from unimm.data.shards import read_manifest, read_samples
from unimm.errors import UnimmError
from unimm.utils import sha256_file


def prepare(inputs, out, teachers=None, **options) -> Path:
    opts = {"prepare.inputs": [str(p) for p in inputs], "prepare.out": str(out)}
    opts.update({f"prepare.{k}": v for k, v in options.items()})
    if teachers:
        opts.update({f"teachers.{k}": str(v) for k, v in teachers.items()})
    run(build_config(PrepareConfig, options=opts), progress=False)
    return Path(out)


def read_back(out) -> list[dict]:
    return list(read_samples(out, split_by_node=False, split_by_worker=False, on_error="fail"))


def shard_hashes(out) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(Path(out).glob("shard-*.tar"))}


def check_against_source(samples, source_records, image_root, image_size):
    assert [s.id for s in samples] == [r.id for r in source_records]
    for sample, rec in zip(samples, source_records, strict=True):
        assert sample.response == rec.response
        assert [s.kind for s in sample.slices] == [s.kind for s in rec.slices]
        for got, want in zip(sample.slices, rec.slices, strict=True):
            assert got.role == want.role
            if want.kind == "text":
                assert got.text == want.value
                continue
            original = Image.open(image_root / want.value).convert("RGB")
            assert got.image.size == target_size(*original.size, image_size)
            assert (got.width, got.height) == got.image.size
            resized = np.asarray(original.resize(got.image.size, Image.Resampling.BICUBIC), dtype=float)
            # JPEG and the DCT-domain downscale change pixels a little, never the content.
            assert np.abs(np.asarray(got.image, dtype=float).mean((0, 1)) - resized.mean((0, 1))).max() < 6


@pytest.mark.parametrize("image_size", [None, 40])
def test_round_trip_unimm(tmp_path, unimm_records, image_size):
    out = prepare([unimm_records], tmp_path / "out", image_size=image_size, samples_per_shard=5)
    manifest = read_manifest(out)
    assert manifest["counts"]["samples"] == 12 and manifest["counts"]["shards"] == 3
    assert manifest["counts"]["image_slices"] == 16 and manifest["counts"]["text_slices"] == 16
    check_against_source(read_back(out), list(iter_records(unimm_records)), tmp_path, image_size)
    # Unchanged JPEGs are copied byte for byte.
    if image_size is None:
        with tarfile.open(out / "shard-000000.tar") as tar:
            stored = tar.extractfile("000000000.1.jpg").read()
        assert stored == (tmp_path / "imgs/0.jpg").read_bytes()


def test_round_trip_llava(tmp_path, image_dir):
    data = [
        {
            "id": "q1",
            "image": "imgs/0.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour?"},
                {"from": "gpt", "value": "Red."},
            ],
        },
        {
            "id": "q2",
            "image": ["imgs/1.jpg", "imgs/2.jpg"],
            "conversations": [
                {"from": "human", "value": "<image> vs <image>"},
                {"from": "gpt", "value": "Green, blue."},
                {"from": "human", "value": "Sure?"},
                {"from": "gpt", "value": "Yes."},
            ],
        },
        {
            "id": "q3",
            "conversations": [{"from": "human", "value": "Text only?"}, {"from": "gpt", "value": "Yes."}],
        },
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(data))
    out = prepare([path], tmp_path / "out", image_size=32)
    samples = read_back(out)
    check_against_source(samples, list(iter_records(path)), tmp_path, 32)
    assert [s.text for s in samples[1].slices] == [None, "vs", None, "Green, blue.", "Sure?"]
    assert samples[1].slices[3].role == "assistant"


def test_round_trip_mmc4(tmp_path, image_dir):
    docs = [
        {
            "text_list": ["Intro.", "Middle.", "End."],
            "image_info": [
                {"image_name": "3.jpg", "matched_text_index": 1},
                {"image_name": "4.jpg", "matched_text_index": 0},
            ],
        },
        {"text_list": ["Alone."], "image_info": []},
    ]
    path = write_jsonl(tmp_path / "mmc4.jsonl", docs)
    out = prepare([path], tmp_path / "out", image_root=str(image_dir), image_size=48, format="mmc4")
    samples = read_back(out)
    check_against_source(samples, list(iter_records(path)), image_dir, 48)
    assert [s.kind for s in samples[0].slices] == ["image", "text", "image", "text", "text"]


def test_round_trip_csv(tmp_path, image_dir):
    path = tmp_path / "pairs.csv"
    path.write_text("image,caption\n" + "".join(f"imgs/{i}.png,colour {i}\n" for i in range(3)))
    for i, colour in enumerate(COLOURS[:3]):  # PNG sources are converted to JPEG
        make_image(tmp_path / "imgs" / f"{i}.png", size=(50, 70), colour=colour, fmt="PNG")
    out = prepare([path], tmp_path / "out", image_size=35)
    samples = read_back(out)
    check_against_source(samples, list(iter_records(path)), tmp_path, 35)
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert Image.open(io.BytesIO(tar.extractfile("000000000.0.jpg").read())).format == "JPEG"


def test_plain_webdataset_reads_documented_members(tmp_path, unimm_records, tiny_teachers):
    out = prepare([unimm_records], tmp_path / "out", teachers=tiny_teachers, samples_per_shard=5)
    ds = wds.WebDataset(str(out / "shard-{000000..000002}.tar"), shardshuffle=False)
    samples = list(ds)
    assert len(samples) == 12
    first = samples[0]
    assert {k for k in first if not k.startswith("__")} == {"json", "1.jpg", "3.jpg", "teacher.safetensors"}
    header = json.loads(first["json"])
    assert header["id"] == "r0" and header["source"] == {"file": "data.jsonl", "line": 1}
    manifest = read_manifest(out)
    assert [s["sha256"] for s in manifest["shards"]] == list(shard_hashes(out).values())
    assert manifest["teachers"]["u_dim"] == 48 and manifest["teachers"]["v_dim"] == 24
    assert manifest["teachers"]["clip"]["model_type"] == "clip"


def test_teacher_features_equal_direct_model_calls(tmp_path, unimm_records, tiny_teachers):
    """Oracle: call each tiny teacher directly on the stored pixels and texts."""
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel, CLIPProcessor

    out = prepare([unimm_records], tmp_path / "out", teachers=tiny_teachers)
    dino = AutoModel.from_pretrained(tiny_teachers["image_expert"]).eval()
    dino_proc = AutoImageProcessor.from_pretrained(tiny_teachers["image_expert"])
    bert = AutoModel.from_pretrained(tiny_teachers["text_expert"]).eval()
    bert_tok = AutoTokenizer.from_pretrained(tiny_teachers["text_expert"])
    clip = CLIPModel.from_pretrained(tiny_teachers["clip"]).eval()
    clip_proc = CLIPProcessor.from_pretrained(tiny_teachers["clip"])

    def unit(x):
        return torch.nn.functional.normalize(x.float().reshape(-1), dim=0)

    with torch.no_grad():
        for sample in read_back(out):
            t = sample.teacher
            assert t["u"].dtype == torch.float16 and t["v"].dtype == torch.float16
            for n, s in enumerate(sample.slices):
                if s.kind == "image":
                    u = dino(**dino_proc(images=s.image, return_tensors="pt")).pooler_output
                    v = clip.get_image_features(
                        **clip_proc(images=s.image, return_tensors="pt")
                    ).pooler_output
                    assert t["modality"][n] == 1
                    assert torch.all(t["u"][n, 32:] == 0)  # padded from 32 to 48
                    u_stored = t["u"][n, :32]
                else:
                    u = bert(**bert_tok(s.text, return_tensors="pt")).last_hidden_state[:, 0]
                    v = clip.get_text_features(
                        **clip_proc.tokenizer(s.text, return_tensors="pt")
                    ).pooler_output
                    assert t["modality"][n] == 0
                    u_stored = t["u"][n]
                torch.testing.assert_close(u_stored.float(), unit(u), atol=2e-3, rtol=0)
                torch.testing.assert_close(t["v"][n].float(), unit(v), atol=2e-3, rtol=0)


def test_deterministic_across_runs_and_workers(tmp_path, unimm_records, tiny_teachers):
    a = prepare([unimm_records], tmp_path / "a", teachers=tiny_teachers, image_size=40, samples_per_shard=4)
    b = prepare(
        [unimm_records], tmp_path / "b", teachers=tiny_teachers, image_size=40, samples_per_shard=4, workers=2
    )
    assert shard_hashes(a) == shard_hashes(b) and len(shard_hashes(a)) == 3
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    # JPEGs copied as they are (no image_size): the pool sends them back without their bytes.
    copied_one = prepare([unimm_records], tmp_path / "c1", samples_per_shard=4)
    copied_two = prepare([unimm_records], tmp_path / "c2", samples_per_shard=4, workers=2)
    assert shard_hashes(copied_one) == shard_hashes(copied_two)
    with tarfile.open(copied_two / "shard-000000.tar") as tar:
        jpegs = [m for m in tar.getmembers() if m.name.endswith(".jpg")]
        assert jpegs and all(m.size > 0 for m in jpegs)


def test_max_shard_bytes_splits(tmp_path, unimm_records):
    out = prepare([unimm_records], tmp_path / "out", max_shard_bytes=12_000)
    manifest = read_manifest(out)
    assert manifest["counts"]["shards"] > 1
    for shard in manifest["shards"]:
        assert shard["bytes"] <= 12_000 or shard["samples"] == 1


def _cli(args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "unimm.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_resume_after_kill_matches_uninterrupted(tmp_path, unimm_records, tiny_teachers):
    args = [
        str(unimm_records),
        "--samples-per-shard",
        "3",
        "--image-size",
        "40",
        "-q",
        "--teacher-image-expert",
        str(tiny_teachers["image_expert"]),
        "--teacher-text-expert",
        str(tiny_teachers["text_expert"]),
        "--teacher-clip",
        str(tiny_teachers["clip"]),
    ]
    full = _cli(["prepare", *args, "--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr
    killed = _cli(["prepare", *args, "--out", str(tmp_path / "part")], env={"UNIMM_FAULT_AFTER_SHARDS": "2"})
    assert killed.returncode == 75
    part = tmp_path / "part"
    assert not (part / "manifest.json").exists()
    assert sorted(p.name for p in part.glob("shard-*")) == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar.tmp",
    ]
    again = _cli(["prepare", *args, "--out", str(part)])
    assert again.returncode == 2 and "--resume" in again.stderr  # refuses to clobber without asking
    resumed = _cli(["prepare", *args, "--out", str(part), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "(2 kept from the earlier run)" in resumed.stdout
    assert shard_hashes(part) == shard_hashes(tmp_path / "full")
    assert (part / "manifest.json").read_bytes() == (tmp_path / "full" / "manifest.json").read_bytes()
    assert not list(part.glob("*.tmp")) and not (part / ".prepare-journal.json").exists()


def test_resume_redoes_damaged_shards_and_refuses_other_inputs(tmp_path, unimm_records):
    out = prepare([unimm_records], tmp_path / "out", samples_per_shard=4)
    before = shard_hashes(out)
    with open(out / "shard-000001.tar", "r+b") as fh:
        fh.seek(700)
        fh.write(b"XXXX")
    prepare([unimm_records], out, samples_per_shard=4, resume=True)
    assert shard_hashes(out) == before
    with pytest.raises(UnimmError, match="prepared from other inputs"):
        prepare([unimm_records], out, samples_per_shard=5, resume=True)
    prepare([unimm_records], out, samples_per_shard=5, overwrite=True)
    assert read_manifest(out)["counts"]["shards"] == 3


# ---------------------------------------------------------------------------------------------
# Bad input: a clear message under fail, a rejects row under skip, nothing else lost


def _bomb_png(path: Path, width: int = 20000, height: int = 20000) -> None:
    """A tiny file whose header claims 400 megapixels (over 2x Pillow's limit)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


BAD_CASES = {
    "malformed_json": ('{"id": "x", "slices": [', "not valid JSON"),
    "missing_image": ({"id": "x", "slices": [{"image": "imgs/none.jpg"}]}, "not found"),
    "corrupt_image": ({"id": "x", "slices": [{"image": "bad/corrupt.jpg"}]}, "not an image Pillow can read"),
    "truncated_image": ({"id": "x", "slices": [{"image": "bad/truncated.jpg"}]}, "cannot decode image"),
    "dotdot_escape": ({"id": "x", "slices": [{"image": "../outside.jpg"}]}, "outside the image root"),
    "absolute_escape": ({"id": "x", "slices": [{"image": "/etc/hostname"}]}, "outside the image root"),
    "symlink_escape": ({"id": "x", "slices": [{"image": "bad/link.jpg"}]}, "outside the image root"),
    "symlink_dir_escape": (
        {"id": "x", "slices": [{"image": "bad/linkdir/outside.jpg"}]},
        "outside the image root",
    ),
    "empty_slices": ({"id": "x", "slices": []}, "'slices' is empty"),
    "unknown_kind": ({"id": "x", "slices": [{"audio": "a.wav"}]}, "exactly one of 'text' or 'image'"),
    "non_string_text": ({"id": "x", "slices": [{"text": ["a"]}]}, "'text' must be a string"),
    "duplicate_id": ({"id": "r0", "slices": [{"text": "again"}]}, "duplicate id"),
    "bomb": ({"id": "x", "slices": [{"image": "bad/bomb.png"}]}, "decompression-bomb limit"),
    # One pathological line must not crash the reader (each was a traceback, or a failure later
    # when the shard was written); the limits are prepare.max_*.
    "deep_nesting": ('{"id": "x", "slices": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    "nesting_over_the_limit": (
        '{"id": "x", "slices": [{"text": "a"}], "meta": {"a": ' + "[" * 40 + "]" * 40 + "}}",
        "nested deeper than 32 levels",
    ),
    "huge_integer": ('{"id": ' + "9" * 5000 + ', "slices": [{"text": "a"}]}', "a number with 5000 digits"),
    "nan": ('{"id": "x", "slices": [{"text": "a"}], "meta": {"v": NaN}}', "NaN is not a JSON number"),
    "lone_surrogate": ('{"id": "x", "slices": [{"text": "a \\ud800 b"}]}', "lone surrogate (\\ud800)"),
    "huge_text": ({"id": "x", "slices": [{"text": "a" * 1_000_001}]}, "a string of 1000001 characters"),
    "too_many_slices": ({"id": "x", "slices": [{"text": "a"}] * 4097}, "4097 slices (limit 4096"),
}


@pytest.fixture
def bad_files(tmp_path, image_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "corrupt.jpg").write_bytes(b"this is not a jpeg at all")
    (bad / "truncated.jpg").write_bytes((image_dir / "5.jpg").read_bytes()[:400])
    make_image(tmp_path.parent / "outside.jpg")
    (bad / "link.jpg").symlink_to(tmp_path.parent / "outside.jpg")
    (bad / "linkdir").symlink_to(tmp_path.parent, target_is_directory=True)
    _bomb_png(bad / "bomb.png")
    return bad


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_fail_and_skip(tmp_path, unimm_records, bad_files, case):
    row, message = BAD_CASES[case]
    lines = unimm_records.read_text().splitlines()
    lines.insert(3, row if isinstance(row, str) else json.dumps(row))
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(lines) + "\n")

    with pytest.raises(UnimmError) as info:  # shards of 2: one is closed before the bad record
        prepare([data], tmp_path / "fail", samples_per_shard=2)
    text = str(info.value)
    assert message in text and f"{data}:4" in text, text
    left = sorted(p.name for p in (tmp_path / "fail").iterdir())
    assert left == [], f"a failed prepare leaves nothing under final names: {left}"

    out = prepare([data], tmp_path / "skip", on_error="skip")
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1
    assert rejects[0]["source"] == str(data) and rejects[0]["line"] == 4 and message in rejects[0]["reason"]
    assert read_manifest(out)["counts"]["samples"] == 12  # every good record is kept
    assert read_manifest(out)["counts"]["rejects"] == 1


def test_all_rejected_is_an_error_that_keeps_the_reasons(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "slices": [{"image": "missing.jpg"}]}])
    with pytest.raises(UnimmError, match="no record could be prepared: all 1 were rejected"):
        prepare([data], tmp_path / "out", on_error="skip")
    assert "missing.jpg" in (tmp_path / "out" / "rejects.jsonl").read_text()
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_many_bad_records_listed_together(tmp_path, image_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": str(i), "slices": []} for i in range(25)])
    with pytest.raises(UnimmError) as info:
        prepare([data], tmp_path / "out")
    message = str(info.value)
    assert "25 bad record(s); nothing was written" in message and "--on-error skip" in message
    assert "25 × " in message and "d.jsonl:1, d.jsonl:2" in message and "… 17 more" in message
    assert message.count("d.jsonl:") == 9  # one example and eight places, not 25 lines


def test_zero_byte_input(tmp_path, unimm_records):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(UnimmError, match=r"empty\.jsonl: input file is empty"):
        prepare([empty], tmp_path / "a")
    out = prepare([unimm_records, empty], tmp_path / "b", on_error="skip")
    (reject,) = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert reject["source"] == str(empty) and reject["line"] is None


def test_unusable_output_directory(tmp_path, unimm_records):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UnimmError, match="exists and is not a directory"):
        prepare([unimm_records], a_file)
    with pytest.raises(UnimmError, match="cannot write there"):
        prepare([unimm_records], a_file / "sub")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    target = locked if os.geteuid() != 0 else Path("/proc/unimm-test-out")  # root ignores modes
    with pytest.raises(UnimmError, match="cannot write there"):
        prepare([unimm_records], target)
    with pytest.raises(UnimmError, match=r"input\(s\) not found: .*missing.jsonl"):
        prepare([tmp_path / "missing.jsonl"], tmp_path / "o")


# ---------------------------------------------------------------------------------------------
# Reader


def test_reader_skips_corrupt_sample_and_counts(tmp_path, unimm_records, caplog):
    from unimm.data.shards import ReadStats, ShardError

    out = prepare([unimm_records], tmp_path / "out", samples_per_shard=6)
    shard = out / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            if m.name == "000000002.1.jpg":
                data = b"garbage"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    # By default the edited shard is refused, named, against its manifest's sha256.
    with pytest.raises(ShardError, match=r"shard-000000\.tar: its sha256 differs from the manifest"):
        list(read_samples(out, split_by_node=False, split_by_worker=False, decode_images=False))
    # Unverified (data.verify=off), the corrupt member is skipped and counted, or fails the read.
    stats = ReadStats()
    unverified = read_samples(out, split_by_node=False, split_by_worker=False, stats=stats, verify="off")
    ids = [s.id for s in unverified]
    assert ids == [f"r{i}" for i in range(12) if i != 2]
    assert stats.skipped == 1 and stats.samples == 11
    assert "shard-000000.tar: member 000000002.1.jpg: cannot decode image" in stats.problems[0]
    with pytest.raises(ShardError, match=r"member 000000002\.1\.jpg"):
        list(read_samples(out, split_by_node=False, split_by_worker=False, on_error="fail", verify="off"))


def test_a_truncated_shard_is_refused_before_its_samples_are_used(tmp_path, unimm_records):
    """It shrank the index silently (68 of 100 documents, a warning): now it is an error naming
    the shard, raised when it is opened; `size` checks that much without hashing."""
    from unimm.data.shards import ShardError

    out = prepare([unimm_records], tmp_path / "out", samples_per_shard=6)
    shard = out / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    for mode in ("full", "size"):
        seen = []
        with pytest.raises(ShardError, match=r"shard-000001\.tar: 3000 bytes, but the manifest says"):
            for sample in read_samples(out, split_by_node=False, split_by_worker=False, verify=mode):
                seen.append(sample.id)
        assert seen == [f"r{i}" for i in range(6)]  # the first, intact shard, then the stop


def test_reader_workers_split_shards_and_shuffle_is_seeded(tmp_path, unimm_records):
    import torch

    out = prepare([unimm_records], tmp_path / "out", samples_per_shard=3)
    pipeline = read_samples(out, split_by_node=False, decode_images=False)
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2)
    ids = [s.id for s in loader]
    assert sorted(ids) == sorted(f"r{i}" for i in range(12))  # every sample exactly once

    def order(seed):
        return [
            s.id
            for s in read_samples(
                out,
                split_by_node=False,
                split_by_worker=False,
                shuffle_shards=True,
                shuffle_buffer=5,
                seed=seed,
                decode_images=False,
            )
        ]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == sorted(ids)


@pytest.mark.parametrize("name", ["000000001.json", "000000001.12.jpg", "x" * 100])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 123_456_789])
def test_ustar_header_equals_tarfile(name, size):
    from unimm.data.shards import ustar_header

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
        size,
        0,
        0o644,
        0,
        0,
        "",
        "",
    )
    assert ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def test_image_path_resolution_inside_root(tmp_path, image_dir):
    from unimm.data.images import ImageProblem, resolve_image_path

    (image_dir / "sub").mkdir()
    (image_dir / "sub" / "alias.jpg").symlink_to(image_dir / "0.jpg")  # a link that stays inside is fine
    assert resolve_image_path("imgs/sub/../0.jpg", tmp_path) == image_dir / "0.jpg"
    assert resolve_image_path("imgs/sub/alias.jpg", tmp_path) == image_dir / "0.jpg"
    assert resolve_image_path(str(image_dir / "1.jpg"), tmp_path) == image_dir / "1.jpg"  # absolute, inside
    for bad in ("imgs/..", "imgs/sub/", "imgs"):
        with pytest.raises(ImageProblem):
            resolve_image_path(bad, image_dir)
