"""Records and adapters: unimm JSONL, LLaVA, MMC4 and CSV map to the documented slices."""

from __future__ import annotations

import contextlib
import json

from helpers import write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unimm.data.adapters import iter_records
from unimm.data.records import Record, RecordSlice, record_from_obj, record_to_obj
from unimm.errors import DataError, UnimmError


def records(path, fmt="auto"):
    return list(iter_records(path, fmt))


def test_unimm_round_trip(tmp_path):
    obj = {
        "id": "a",
        "slices": [{"text": "hi"}, {"image": "x.jpg"}, {"text": "earlier answer", "role": "assistant"}],
        "response": "yes",
        "meta": {"k": 1},
    }
    (rec,) = records(write_jsonl(tmp_path / "d.jsonl", [obj]))
    assert rec.slices == [
        RecordSlice("text", "hi"),
        RecordSlice("image", "x.jpg"),
        RecordSlice("text", "earlier answer", "assistant"),
    ]
    assert (rec.source, rec.line) == (str(tmp_path / "d.jsonl"), 1)
    assert record_to_obj(rec) == obj


def test_unimm_errors_are_located(tmp_path):
    rows = [
        {"id": "ok", "slices": [{"text": "fine"}]},
        "{not json",
        {"id": "empty", "slices": []},
        {"id": "kind", "slices": [{"video": "v.mp4"}]},
        {"id": "num", "slices": [{"text": 5}]},
        {"id": "typo", "slices": [{"text": "x"}], "reponse": "lost"},
        {"slices": [{"text": "no id"}]},
    ]
    out = records(write_jsonl(tmp_path / "d.jsonl", rows))
    assert isinstance(out[0], Record)
    errors = out[1:]
    assert all(isinstance(e, DataError) for e in errors)
    assert [e.line for e in errors] == [2, 3, 4, 5, 6, 7]
    text = [str(e) for e in errors]
    assert "d.jsonl:2: not valid JSON" in text[0]
    assert "record 'empty': 'slices' is empty" in text[1]
    assert "exactly one of 'text' or 'image'" in text[2]
    assert "'text' must be a string, got int" in text[3]
    assert "unknown key(s) 'reponse'" in text[4]
    assert "missing or invalid 'id'" in text[5]


def test_json_array_items_located_by_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"id": "a", "slices": [{"text": "x"}]},\n  {"id": "b", "slices": []}\n]\n')
    out = records(path)
    assert out[0].line == 2
    assert isinstance(out[1], DataError) and out[1].line == 3


def test_llava_multi_turn_multi_image(tmp_path):
    sample = {
        "id": 7,
        "image": ["a.jpg", "b.jpg"],
        "conversations": [
            {"from": "human", "value": "<image>\nCompare with <image> please."},
            {"from": "gpt", "value": "The first is red."},
            {"from": "human", "value": "And the second?"},
            {"from": "gpt", "value": "Blue."},
        ],
    }
    path = tmp_path / "llava.json"
    path.write_text(json.dumps([sample]))
    (rec,) = records(path)
    assert rec.id == "7"
    assert rec.slices == [
        RecordSlice("image", "a.jpg"),
        RecordSlice("text", "Compare with"),
        RecordSlice("image", "b.jpg"),
        RecordSlice("text", "please."),
        RecordSlice("text", "The first is red.", "assistant"),
        RecordSlice("text", "And the second?"),
    ]
    assert rec.response == "Blue."


def test_llava_without_placeholder_puts_image_first(tmp_path):
    sample = {
        "id": "s",
        "image": "a.jpg",
        "conversations": [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A cat."}],
    }
    (rec,) = records(write_jsonl(tmp_path / "l.jsonl", [sample]))
    assert rec.slices == [RecordSlice("image", "a.jpg"), RecordSlice("text", "What is it?")]
    assert rec.response == "A cat."


def test_llava_errors(tmp_path):
    rows = [
        {"id": "m", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image> <image>"}]},
        {"id": "r", "conversations": [{"from": "robot", "value": "x"}]},
    ]
    out = records(write_jsonl(tmp_path / "l.jsonl", rows), "llava")
    assert "2 '<image>' placeholder(s) but 1 image(s)" in str(out[0])
    assert "'from' must be human or gpt" in str(out[1])


def test_mmc4_images_before_matched_sentence(tmp_path):
    doc = {
        "url": "http://example.org/x",
        "text_list": ["First sentence.", "", "Third sentence."],
        "image_info": [
            {"image_name": "b.jpg", "matched_text_index": 2},
            {"image_name": "a.jpg", "matched_text_index": 0},
            {"image_name": "c.jpg", "matched_text_index": 2},
        ],
    }
    (rec,) = records(write_jsonl(tmp_path / "docs.jsonl", [doc]))
    assert rec.id == "docs-1"
    assert rec.slices == [
        RecordSlice("image", "a.jpg"),
        RecordSlice("text", "First sentence."),
        RecordSlice("image", "b.jpg"),
        RecordSlice("image", "c.jpg"),
        RecordSlice("text", "Third sentence."),
    ]
    assert rec.meta == {"url": "http://example.org/x"}
    bad = dict(doc, image_info=[{"image_name": "a.jpg", "matched_text_index": 9}])
    (err,) = records(write_jsonl(tmp_path / "bad.jsonl", [bad]), "mmc4")
    assert "matched_text_index must be an index into text_list (0..2)" in str(err)


def test_csv_and_tsv(tmp_path):
    (tmp_path / "c.csv").write_text('image,caption\na.jpg,"A red, round thing"\nb.jpg,\n')
    out = records(tmp_path / "c.csv")
    assert out[0].slices == [RecordSlice("image", "a.jpg"), RecordSlice("text", "A red, round thing")]
    assert out[0].id == "c-2"
    assert isinstance(out[1], DataError) and out[1].line == 3 and "empty 'caption'" in str(out[1])
    (tmp_path / "t.tsv").write_text("id\tImage\tCaption\nx1\ta.jpg\tTabbed caption\n")
    (rec,) = records(tmp_path / "t.tsv")
    assert (rec.id, rec.slices[1].value) == ("x1", "Tabbed caption")
    (tmp_path / "h.csv").write_text("path,text\na.jpg,x\n")
    (err,) = records(tmp_path / "h.csv")
    assert "must name 'image' and 'caption' columns" in str(err)


def test_empty_and_undetectable_files(tmp_path):
    (tmp_path / "e.jsonl").write_bytes(b"")
    (err,) = records(tmp_path / "e.jsonl")
    assert "input file is empty" in str(err)
    (err,) = records(write_jsonl(tmp_path / "u.jsonl", [{"foo": 1}]))
    assert "cannot tell the format" in str(err) and "--format" in str(err)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(
                st.sampled_from(["id", "slices", "text", "image", "role", "response", "meta", "x"])
                | st.text(max_size=4),
                inner,
                max_size=4,
            )
        ),
        max_leaves=12,
    )
)
def test_arbitrary_json_only_raises_our_error(obj):
    with contextlib.suppress(UnimmError):
        record_from_obj(obj, source="f", line=1)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64), st.sampled_from(["auto", "unimm", "llava", "mmc4"]))
def test_arbitrary_lines_only_yield_records_or_errors(tmp_path_factory, data, fmt):
    path = tmp_path_factory.mktemp("h") / "x.jsonl"
    path.write_bytes(data)
    for item in iter_records(path, fmt):
        assert isinstance(item, (Record, DataError))


def test_a_llava_from_that_is_not_a_string_is_a_bad_record(tmp_path):
    rows = [{"id": "l", "conversations": [{"from": ["human"], "value": "hi"}]}]
    (out,) = records(write_jsonl(tmp_path / "l.jsonl", rows), "llava")
    assert isinstance(out, DataError) and "'from' must be human or gpt, got ['human']" in str(out)


def test_a_csv_field_over_the_limit_is_one_bad_row(tmp_path):
    from unimm.data.records import RecordLimits

    path = tmp_path / "c.csv"
    path.write_text("image,caption\na.jpg," + "x" * 2000 + "\nb.jpg,fine\n")
    out = list(iter_records(path, "csv", RecordLimits(text_chars=1000)))
    assert isinstance(out[0], DataError) and "field larger than field limit" in str(out[0])
    assert isinstance(out[1], Record) and out[1].slices[1].value == "fine" and out[1].line == 3


# Full Unicode, lone surrogates included (JSON can escape them: \ud800), in every adapter's shape.
_ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=8)
_SHAPES = {
    "unimm": lambda t: {"id": t, "slices": [{"text": t}, {"image": t}], "response": t},
    "llava": lambda t: {
        "id": t,
        "image": t,
        "conversations": [{"from": "human", "value": t + "<image>"}, {"from": "gpt", "value": t}],
    },
    "mmc4": lambda t: {
        "doc_id": t,
        "text_list": [t, t],
        "image_info": [{"image_name": t, "matched_text_index": 1}],
    },
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(_SHAPES)), _ANY_TEXT, st.booleans())
def test_full_unicode_in_every_adapter_yields_records_or_our_errors(tmp_path, fmt, text, ascii_escapes):
    """Only a Record (all of its text valid UTF-8) or a DataError comes out, whatever the text."""
    path = tmp_path / "f.jsonl"
    line = json.dumps(_SHAPES[fmt](text), ensure_ascii=ascii_escapes)
    path.write_bytes(line.encode("utf-8", "surrogatepass") + b"\n")
    for item in iter_records(path, fmt):
        assert isinstance(item, (Record, DataError))
        if isinstance(item, Record):
            for piece in [item.id, item.response or "", *(s.value for s in item.slices)]:
                piece.encode("utf-8")  # strict: a lone surrogate would raise here


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(_ANY_TEXT, min_size=1, max_size=3), max_size=4))
def test_full_unicode_csv_yields_records_or_our_errors(tmp_path, rows):
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "caption"])
    writer.writerows(rows)
    path = tmp_path / "f.csv"
    path.write_bytes(buffer.getvalue().encode("utf-8", "surrogatepass"))
    for item in iter_records(path, "csv"):
        assert isinstance(item, (Record, DataError))
