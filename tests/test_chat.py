"""`unimm chat`: one-shot, the REPL through a stream, retrieval-augmented prompts, errors."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from unimm.config import ChatOptions
from unimm.data.samples import Slice
from unimm.errors import UnimmError
from unimm.inference.chat import ChatSession, one_shot, repl


def test_one_shot_answers_and_streams(tmp_path, trained):
    checkpoint, _ = trained
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "a.png")
    out = io.StringIO()
    answer = one_shot(
        ChatOptions(
            model=str(checkpoint), prompt="What colour?", images=[str(tmp_path / "a.png")], max_new_tokens=5
        ),
        out,
    )
    assert isinstance(answer, str) and answer
    assert answer in out.getvalue().replace("\n", " ")  # the streamed text is the answer


def test_repl_through_a_stream(tmp_path, trained):
    checkpoint, _ = trained
    Image.new("RGB", (32, 32), "red").save(tmp_path / "b.png")
    lines = io.StringIO(
        f"/image {tmp_path / 'b.png'}\nWhat shape?\nAnd its colour?\n/reset\n/image nope.png\n/exit\n"
    )
    out = io.StringIO()
    session = repl(ChatOptions(model=str(checkpoint), max_new_tokens=4), lines, out)
    text = out.getvalue()
    assert text.count("assistant: ") == 2 and "(image attached" in text and "(conversation cleared)" in text
    assert "error:" in text  # the unreadable image is reported, the session goes on
    assert session.history == []  # /reset cleared it


def test_the_conversation_so_far_comes_before_the_next_question(trained):
    checkpoint, _ = trained
    session = ChatSession(ChatOptions(model=str(checkpoint), max_new_tokens=3))
    first = session.answer([Slice.of_text("What shape?")])
    session.answer([Slice.of_text("And its colour?")])
    assert session.last_prompt.slices == [
        Slice.of_text("What shape?"),
        Slice.of_text(first or "…", role="assistant"),
        Slice.of_text("And its colour?"),
    ]
    assert [s.role for s in session.history] == ["user", "assistant", "user", "assistant"]


def test_rag_puts_the_retrieved_documents_before_the_question(trained):
    checkpoint, index = trained
    session = ChatSession(ChatOptions(model=str(checkpoint), index=str(index), top_k=2, max_new_tokens=3))
    session.answer([Slice.of_text("Which shapes are red?")], io.StringIO())
    prompt = session.last_prompt
    texts = [s.text for s in prompt.slices]
    assert texts[0] == f"Retrieved item 1 ({session.last_retrieved[0]}):"
    assert f"Retrieved item 2 ({session.last_retrieved[1]}):" in texts
    assert texts[-1] == "Which shapes are red?"
    from unimm.inference.documents import load_document

    rows = session.searcher.rows
    first = load_document(
        rows[[r["id"] for r in rows].index(session.last_retrieved[0])], session.searcher.manifest["data"]
    )
    n = len(first.slices)
    assert prompt.kinds()[1 : 1 + n] == first.kinds()
    collator = session.session.collator
    encoded = collator.encode(prompt)
    ids = collator._ids(first.texts()[0])
    assert any(encoded.input_ids[i : i + len(ids)] == ids for i in range(len(encoded.input_ids)))


def test_clear_errors(trained):
    checkpoint, _ = trained
    session = ChatSession(ChatOptions(model=str(checkpoint)))
    with pytest.raises(UnimmError, match="empty message"):
        session.answer([])
    with pytest.raises(UnimmError, match="cannot read it"):
        one_shot(ChatOptions(model=str(checkpoint), prompt="x", images=["/nonexistent.png"]))


def test_the_repl_survives_every_bad_turn(tmp_path, trained):
    """A bare /image, a missing file, a decompression bomb, bytes that are not UTF-8 and empty
    lines each get a message (or are skipped) and the conversation goes on."""
    checkpoint, _ = trained
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 M pixels: over Pillow's bomb limit
    lines = io.StringIO(
        f"/image\n/image {tmp_path / 'missing.png'}\n/image {bomb}\n\n   \nhi \udcff\udcfe there\n/exit\n"
    )
    out = io.StringIO()
    repl(ChatOptions(model=str(checkpoint), max_new_tokens=3), lines, out)
    text = out.getvalue()
    assert "error: give the image's path: /image PATH" in text
    assert text.count("error: image") == 2  # the missing file and the bomb, each named
    assert "decompression bomb" in text.lower() or "exceeds limit" in text
    assert text.count("assistant: ") == 1  # the non-UTF-8 line was answered


def test_chat_under_an_ascii_terminal_with_bad_bytes(trained):
    """`LANG=C`-like streams (ASCII, strict) and undecodable stdin: no traceback, exit 0."""
    import os
    import subprocess
    import sys

    checkpoint, _ = trained
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "LC_ALL": "C", "LANG": "C"}
    done = subprocess.run(
        [sys.executable, "-m", "unimm.cli", "chat", "--model", str(checkpoint), "--max-new-tokens", "2"],
        input=b"caf\xc3\xa9 \xff\xfe?\n/image\n/exit\n",
        capture_output=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"Traceback" not in done.stderr and b"assistant: " in done.stdout
    assert b"unimm chat - /image PATH" in done.stdout
