"""The decoded sample type: slices validate themselves, shard headers decode into them or are named."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from unimm.data.samples import Sample, Slice
from unimm.data.shards import SampleError, decode_images_in, decode_sample


def _jpeg(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


def _raw(slices, **members) -> dict:
    header = {"id": "r1", "slices": slices, "response": "red", "meta": {"kind": "qa"}, "source": "d.jsonl:3"}
    names = {"__key__": "000001", "__url__": "shard-000000.tar"}
    return {**names, "json": json.dumps(header).encode(), **members}


def test_a_header_decodes_into_typed_slices():
    raw = _raw(
        [
            {"kind": "image", "width": 8, "height": 8, "role": "user"},
            {"kind": "text", "text": "What colour?", "role": "user"},
            {"kind": "text", "text": "Blue.", "role": "assistant"},
        ],
        **{"0.jpg": _jpeg("blue")},
    )
    sample = decode_sample(raw)
    assert (sample.key, sample.id, sample.response, sample.url) == ("000001", "r1", "red", "shard-000000.tar")
    assert sample.meta == {"kind": "qa"} and sample.source == "d.jsonl:3" and sample.teacher is None
    assert sample.kinds() == ["image", "text", "text"] and sample.texts() == ["What colour?", "Blue."]
    assert [s.role for s in sample.slices] == ["user", "user", "assistant"]
    image = sample.slices[0]
    assert image.image.size == (8, 8) and (image.width, image.height) == (8, 8)
    lazy = decode_sample(raw, decode_images=False)
    assert lazy.slices[0].image == raw["0.jpg"]
    (decoded,), problems = decode_images_in([lazy])
    assert problems == [] and decoded.slices[0].image.tobytes() == sample.slices[0].image.tobytes()
    assert decoded.slices[1:] == sample.slices[1:] and lazy.slices[0].image == raw["0.jpg"]  # a copy


@pytest.mark.parametrize(
    ("slices", "members", "named"),
    [
        ([{"kind": "text", "text": 5}], {}, "000001.json: not a unimm sample header"),
        ([{"kind": "audio", "text": "x"}], {}, "000001.json: not a unimm sample header"),
        ([{"kind": "text", "text": "x", "role": "system"}], {}, "000001.json: not a unimm sample header"),
        ([{"text": "no kind"}], {}, "000001.json: not a unimm sample header"),
        ([{"kind": "image"}], {}, "000001.0.jpg: missing"),
        ([{"kind": "image"}], {"0.jpg": b"not a jpeg"}, "000001.0.jpg: cannot decode image"),
    ],
)
def test_a_bad_header_or_member_is_named(slices, members, named):
    with pytest.raises(SampleError, match=named.replace(".", r"\.")):
        decode_sample(_raw(slices, **members))


def test_slices_check_what_they_hold():
    with pytest.raises(TypeError, match="text slice needs a str"):
        Slice("text", text=None)
    with pytest.raises(TypeError, match="image slice needs an image"):
        Slice("image")
    with pytest.raises(TypeError, match="role"):
        Slice.of_text("x", role="narrator")
    assert Slice.of_text("x").as_role("assistant") == Slice("text", text="x", role="assistant")
    prompt = Sample.of_slices([Slice.of_text("q")], key="q1")
    assert prompt.replace(response="a").response == "a" and prompt.response is None
