"""The quickstart end to end at a reduced size, and the synthetic data it draws."""

from __future__ import annotations

import json

from PIL import Image

from unimm.data.synthetic import COLOURS, Scene, draw_scene, write_synthetic


def test_quickstart_end_to_end(tmp_path, capsys):
    from unimm.quickstart import run

    summary = run(tmp_path / "qs", records=24, steps=4, progress=False)
    assert summary["samples"] == 24 and summary["skipped"] == 0
    assert sum(summary["kinds"].values()) == 24
    assert summary["teacher_dims"] == {"u": 48, "v": 24}
    printed = capsys.readouterr().out
    assert "$ unimm prepare" in printed and "samples read back : 24 of 24" in printed
    assert "$ unimm train" in printed and "loss_gen" in printed
    from unimm.model.checkpoint import read_meta

    assert read_meta(summary["checkpoint"])["step"] == 4


def test_synthetic_data_is_deterministic_and_consistent(tmp_path):
    a = write_synthetic(tmp_path / "a", 40, seed=3)
    b = write_synthetic(tmp_path / "b", 40, seed=3)
    assert a.read_bytes() == b.read_bytes()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(rows) == 40 and len({r["id"] for r in rows}) == 40
    for row in rows:
        kind = row["meta"]["kind"]
        if kind in ("caption", "pair"):
            assert row["slices"][1]["text"] == row["meta"]["caption"]
        if kind == "qa":
            assert row["response"] and row["response"] in row["meta"]["caption"]  # "square" in "squares"
    pairs = {}
    for row in rows:
        if row["meta"]["kind"] == "pair":
            pairs.setdefault(row["meta"]["pair"], []).append(row["meta"]["caption"].split())
    for first, second in (p for p in pairs.values() if len(p) == 2):
        assert sum(x != y for x, y in zip(first, second, strict=False)) >= 1


def test_scene_pixels_match_caption():
    img = draw_scene(Scene("square", "red", "left", 2), size=64)
    pixels = img.load()
    red = [(x, y) for x in range(64) for y in range(64) if pixels[x, y] == COLOURS["red"]]
    assert red and all(x < 32 for x, _ in red)  # all red pixels in the left half
    assert isinstance(img, Image.Image)
