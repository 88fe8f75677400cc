"""Every image mode Pillow opens becomes the RGB it looks like (a 16-bit PNG was stored almost
white), checked pixel by pixel against the expected colours, and end to end through prepare."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from unimm.data.images import to_rgb


def _png_round_trip(img: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


def _palette_with_transparency() -> Image.Image:
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putdata([0, 1])
    img.info["transparency"] = 1  # the second (blue) colour is transparent: white
    return img


CASES = [
    (
        "16-bit grey PNG",
        lambda: _png_round_trip(Image.fromarray(np.full((2, 2), 128 * 257, np.uint16))),
        (128, 128, 128),
    ),
    ("16-bit as I", lambda: Image.fromarray(np.full((2, 2), 65535, np.int32), mode="I"), (255, 255, 255)),
    ("8-bit values as I", lambda: Image.fromarray(np.full((2, 2), 200, np.int32), mode="I"), (200, 200, 200)),
    ("float in [0, 1]", lambda: Image.fromarray(np.full((2, 2), 0.5, np.float32), mode="F"), (128, 128, 128)),
    ("float in [0, 255]", lambda: Image.fromarray(np.full((2, 2), 64.0, np.float32), mode="F"), (64, 64, 64)),
    ("LA transparent", lambda: Image.new("LA", (2, 2), (0, 0)), (255, 255, 255)),
    ("LA opaque", lambda: Image.new("LA", (2, 2), (0, 255)), (0, 0, 0)),
    ("RGBA half", lambda: Image.new("RGBA", (2, 2), (0, 0, 0, 128)), (127, 127, 127)),
    ("CMYK red", lambda: Image.new("CMYK", (2, 2), (0, 255, 255, 0)), (255, 0, 0)),
    ("bilevel", lambda: Image.new("1", (2, 2), 1), (255, 255, 255)),
    ("L", lambda: Image.new("L", (2, 2), 77), (77, 77, 77)),
]


@pytest.mark.parametrize(("name", "make", "colour"), CASES, ids=[c[0] for c in CASES])
def test_each_mode_becomes_the_rgb_it_looks_like(name, make, colour):
    out = to_rgb(make())
    assert out.mode == "RGB"
    assert np.abs(np.asarray(out, dtype=int) - np.array(colour)).max() <= 1, np.asarray(out)[0, 0]


def test_a_palette_with_a_transparent_colour_shows_white_there():
    out = np.asarray(to_rgb(_palette_with_transparency()))
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [255, 255, 255]


def test_prepare_stores_a_16_bit_png_and_an_exif_rotated_jpeg_as_they_look(tmp_path):
    """Through `unimm prepare`: the 16-bit grey PNG keeps its grey (mean 128, it was 254), an EXIF
    orientation 6 JPEG is stored upright (its width and height swapped)."""
    from typer.testing import CliRunner

    from unimm.cli import app
    from unimm.data.shards import read_samples

    Image.fromarray(np.full((40, 60), 128 * 257, np.uint16)).save(tmp_path / "grey16.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (60, 40), (10, 200, 10)).save(tmp_path / "rotated.jpg", exif=exif)
    rows = [
        {"id": "g", "slices": [{"image": "grey16.png"}, {"text": "grey"}]},
        {"id": "r", "slices": [{"image": "rotated.jpg"}, {"text": "green"}]},
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(
        app, ["prepare", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "s"), "-q"]
    )
    assert result.exit_code == 0, result.output
    samples = {s.id: s for s in read_samples(tmp_path / "s", split_by_node=False, split_by_worker=False)}
    grey = np.asarray(samples["g"].slices[0].image.convert("RGB"), dtype=float)
    assert abs(grey.mean() - 128) < 2
    assert samples["r"].slices[0].image.size == (40, 60)
