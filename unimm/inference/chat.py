"""``unimm chat``: talk to a checkpoint, optionally grounded on what it retrieves itself.

    unimm chat --model RUN/step-000200                                  # REPL: /image PATH, /reset, /exit
    unimm chat --model RUN/step-000200 --prompt "What colour?" --image a.png
    unimm chat --model RUN/step-000200 --index index --top-k 2 --prompt "Which shapes are red?"

Retrieval-augmented template: the question (with the conversation so far) is embedded with the
same model, the ``top_k`` nearest documents are read back from their shards, and their slices
are inserted before the question::

    USER: Retrieved item 1 (ID):\\n{item slices…}\\nRetrieved item 2 (ID):\\n…\\n{question slices} ASSISTANT:

Tokens stream to the terminal as they are generated (greedy by default; ``--temperature`` and
``--top-p`` sample).
"""

from __future__ import annotations

import contextlib
import sys
from typing import TextIO

from unimm.config import ChatOptions
from unimm.data.samples import Sample, Slice
from unimm.errors import UnimmError


def build_prompt(question: list[Slice], retrieved: list[Sample], history: list[Slice]) -> Sample:
    """The sample to generate from: retrieved items, then the conversation, then the question.

    ``history`` is the conversation so far as slices: the user's (role ``user``) and the answers
    (text slices of role ``assistant``).
    """
    slices = retrieved_slices(retrieved)
    slices.extend(history)
    slices.extend(question)
    return Sample.of_slices(slices, key="chat", id="chat")


def retrieved_slices(retrieved: list[Sample]) -> list[Slice]:
    """The retrieval template's part before the question: ``Retrieved item k (ID):`` and the
    document's slices, for each document (the one definition, for chat and for evaluation)."""
    slices: list[Slice] = []
    for k, doc in enumerate(retrieved, start=1):
        slices.append(Slice.of_text(f"Retrieved item {k} ({doc.id}):"))
        slices.extend(s.as_role("user") for s in doc.slices)
    return slices


class ChatSession:
    """A loaded model (and optional index) that answers messages and keeps the conversation."""

    def __init__(self, opts: ChatOptions) -> None:
        from unimm.inference.session import Session
        from unimm.inference.vectordb import searcher_for

        self.opts = opts
        self.session = Session.load(opts.model, **opts.session_options())
        self.searcher = searcher_for(opts, self.session)
        self.history: list[Slice] = []
        self.last_prompt: Sample | None = None
        self.last_retrieved: list[str] = []

    def retrieve(self, question: list[Slice]) -> list[Sample]:
        """The ``top_k`` documents of the index nearest to the conversation and ``question``."""
        from unimm.inference.documents import load_document

        if self.searcher is None:
            return []
        emb = self.session.embed_views([build_prompt(question, [], self.history)], role="query")
        (hits,) = self.searcher.search(emb, self.opts.top_k)
        data = self.searcher.manifest["data"]
        return [load_document(self.searcher.rows[r], data) for r, _ in hits]

    def answer(self, question: list[Slice], stream: TextIO | None = None) -> str:
        """Generate the answer to ``question`` (slices), streaming tokens to ``stream``."""
        if not question:
            raise UnimmError("empty message: type some text (and /image PATH to attach an image)")
        retrieved = self.retrieve(question)
        self.last_retrieved = [d.id for d in retrieved]
        sample = build_prompt(question, retrieved, self.history)
        self.last_prompt = sample
        (text,) = self.session.generate(
            [sample],
            max_new_tokens=self.opts.max_new_tokens,
            temperature=self.opts.temperature,
            top_p=self.opts.top_p,
            streamer=_Streamer(self.session.tokenizer, stream) if stream is not None else None,
        )
        self.history.extend(question)
        self.history.append(Slice.of_text(text or "…", role="assistant"))
        return text


class _Streamer:
    """Prints decoded tokens as they arrive (the prompt is skipped)."""

    def __init__(self, tokenizer, stream: TextIO) -> None:
        from transformers import TextStreamer

        self._inner = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._inner.on_finalized_text = self._write
        self.stream = stream

    def _write(self, text: str, stream_end: bool = False) -> None:
        self.stream.write(text + ("\n" if stream_end else ""))
        self.stream.flush()

    def put(self, value) -> None:
        self._inner.put(value)

    def end(self) -> None:
        self._inner.end()


def _image_slice(path: str) -> Slice:
    from unimm.data.adapters import open_image

    if not path:
        raise UnimmError("give the image's path: /image PATH")
    return Slice.of_image(open_image(path))


def _tolerant(lines: TextIO, stream: TextIO) -> None:
    """Streams that survive any bytes and any terminal: undecodable input is kept as escapes (and
    cleaned per line, :func:`_clean`), output a terminal cannot show becomes ``?`` (``LANG=C``)."""
    for handle, errors in ((lines, "surrogateescape"), (stream, "replace")):
        reconfigure = getattr(handle, "reconfigure", None)
        if callable(reconfigure):
            with contextlib.suppress(ValueError, OSError):  # already read from, or not a text file
                reconfigure(errors=errors)


def _clean(text: str) -> str:
    """``text`` as valid Unicode: bytes that were not UTF-8 become U+FFFD (a tokenizer refuses
    the lone surrogates they decode to)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def one_shot(opts: ChatOptions, stream: TextIO | None = None, *, quiet: bool = False) -> str:
    """Answer ``opts.prompt`` (with ``opts.images`` before it) once, streaming to ``stream``
    (default: the standard output at call time); ``quiet``: the answer alone."""
    stream = stream if stream is not None else sys.stdout
    _tolerant(sys.stdin, stream)
    session = ChatSession(opts)
    question = [_image_slice(p) for p in opts.images]
    if opts.prompt and opts.prompt.strip():
        question.append(Slice.of_text(_clean(opts.prompt)))
    answer = session.answer(question, stream)
    if session.last_retrieved and not quiet:
        stream.write(f"[retrieved: {', '.join(session.last_retrieved)}]\n")
    return answer


def repl(
    opts: ChatOptions, lines: TextIO | None = None, stream: TextIO | None = None, *, quiet: bool = False
) -> ChatSession:
    """Interactive chat: a line is a message; ``/image PATH`` attaches an image, ``/reset``, ``/exit``.

    ``lines`` and ``stream`` default to the standard input and output at call time; ``quiet``
    leaves out the banner and the retrieved-document lines.
    """
    lines = lines if lines is not None else sys.stdin
    stream = stream if stream is not None else sys.stdout
    _tolerant(lines, stream)
    session = ChatSession(opts)
    pending: list[Slice] = []
    if not quiet:
        stream.write(
            "unimm chat - /image PATH attaches an image, /reset clears the conversation, /exit quits\n"
        )
    for raw in lines:
        line = _clean(raw).strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            session.history.clear()
            pending.clear()
            stream.write("(conversation cleared)\n")
            continue
        try:  # a bad turn (an unreadable image, ...) is reported and the conversation goes on
            if line.startswith("/image"):
                pending.append(_image_slice(line[len("/image") :].strip()))
                stream.write("(image attached to your next message)\n")
                continue
            stream.write("assistant: ")
            session.answer([*pending, Slice.of_text(line)], stream)
        except UnimmError as exc:
            stream.write(f"error: {exc}\n")
            continue
        if session.last_retrieved and not quiet:
            stream.write(f"[retrieved: {', '.join(session.last_retrieved)}]\n")
        pending = []
    return session
