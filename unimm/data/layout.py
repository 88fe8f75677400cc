"""How a sample becomes prompt text: the model's own chat template, or LLaVA-1.5's plain layout.

A layout renders a sample's slices (and its response) as one string in which every image is the
processor's image placeholder (``processor.image_token``), and says where each slice and the answer
lie in it (character ranges). :class:`~unimm.data.collate.Collator` then lets the processor expand
each placeholder and tokenizes the whole string once, as the processor itself does.

**Chat template** (:class:`ChatLayout`, the default when the processor has one): the conversation
goes through ``processor.apply_chat_template`` (system text, roles, image markup such as Qwen's
``<|vision_start|>…<|vision_end|>``, the generation prompt), with every text slice as a sentinel
that is swapped for its text afterwards (so a template that trims or escapes text cannot move a
span). Slices of one turn are the content parts of one message, in order; two text slices in a row
are joined by a newline (every pre-tokenizer splits there, so no token straddles two slices and a
view's tokens never depend on what follows it). Earlier ``role: assistant`` slices become
assistant messages. A template that does not keep the parts in their order (LLaVA-1.5-hf's puts
every image first) cannot describe an interleaved document: such a model gets the plain layout,
and says so.

**Plain** (:class:`PlainLayout`, models without a chat template, e.g. the tiny LLaVA)::

    <s>{system} USER: {slice 1}\\n{slice 2}\\n… ASSISTANT: {response}</s>

Either way a prompt to generate from is the exact prefix that training saw before the answer
(``ending="assistant"``) or before the document's next slice (``ending="slice"``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, ClassVar

from unimm.data.samples import Slice

log = logging.getLogger(__name__)

ENDINGS = ("assistant", "slice")


@dataclasses.dataclass
class Rendered:
    """A rendered sample.

    ``places``: ``(slice, start, end)`` character ranges, in slice order (an image's range is its
    placeholder); ``answer``: where the labelled answer starts (everything after it is learned:
    the answer and the turn's end), ``None`` without a response; ``closing``: where the
    document's labelled end mark starts, ``None`` when the document is left open.
    """

    text: str
    places: list[tuple[Slice, int, int]]
    answer: int | None = None
    closing: int | None = None


class LayoutError(ValueError):
    """A chat template cannot lay out this sample in order."""


class PlainLayout:
    """LLaVA-1.5's layout (see the module docs)."""

    name = "plain"
    ENDINGS: ClassVar[dict[str, str]] = {"assistant": " ASSISTANT:", "slice": "\n"}

    def __init__(self, tokenizer, placeholder: str, system_prompt: str = "") -> None:
        self.bos = tokenizer.bos_token or ""
        self.eos = tokenizer.eos_token or ""
        self.placeholder = placeholder
        self.system_prompt = system_prompt

    def render(
        self,
        slices: list[Slice],
        response: str | None,
        *,
        closed: bool = False,
        ending: str | None = None,
        system: str | None = None,
    ) -> Rendered:
        """``slices`` (and ``response``) as text; ``closed`` adds the document's ``</s>``,
        ``ending`` ends it as a prompt (:data:`ENDINGS`); ``system`` (an instruction) takes the
        system prompt's place."""
        system = system or self.system_prompt
        system = f"{system} " if system else ""
        text = f"{self.bos}{system}USER: "
        places = []
        for n, item in enumerate(slices):
            text += " ASSISTANT: " if item.role == "assistant" else ("\n" if n > 0 else "")
            body = self.placeholder if item.kind == "image" else item.text
            places.append((item, len(text), len(text) + len(body)))
            text += body
            if item.role == "assistant":
                text += self.eos + "USER: "
        out = Rendered(text, places)
        if response is not None:
            # "ASSISTANT:" then " answer": the space belongs to the answer's first token, as the
            # prompt to generate from ends at the colon.
            out.text += self.ENDINGS["assistant"] + " "
            out.answer = len(out.text) - 1
            out.text += response + self.eos
        elif ending is not None:
            out.text += self.ENDINGS[ending]
        elif closed and self.eos:
            # A document ends with </s> (as LLaVA's pre-training captions do), so that text
            # generated after its last slice learns to stop.
            out.closing = len(out.text)
            out.text += self.eos
        return out


_SENTINEL = re.compile("\ue000(\\d+|a)\ue001")


def _sentinel(name: int | str) -> str:
    return f"\ue000{name}\ue001"


_SHAPES_KEPT = 4096  # rendered templates kept per layout (distinct slice shapes)


class ChatLayout:
    """The processor's chat template (see the module docs)."""

    name = "chat template"

    def __init__(self, processor, placeholder: str, system_prompt: str = "") -> None:
        self.processor = processor
        self.placeholder = placeholder
        self.system_prompt = system_prompt
        self._templates: dict[tuple, str] = {}

    def _messages(self, slices: list[Slice], response: str | None, system: str) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        for n, item in enumerate(slices):
            role = "assistant" if item.role == "assistant" else "user"
            if not messages or messages[-1]["role"] != role:
                messages.append({"role": role, "content": []})
            part = {"type": "image"} if item.kind == "image" else {"type": "text", "text": _sentinel(n)}
            messages[-1]["content"].append(part)
        if not messages or messages[-1]["role"] != "user":
            messages.append({"role": "user", "content": []})
        if response is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": _sentinel("a")}]})
        return messages

    def _apply(self, messages: list[dict[str, Any]], *, generation_prompt: bool) -> str:
        try:
            text = self.processor.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as exc:  # jinja2 raises its own types (and raise_exception's message)
            raise LayoutError(f"its chat template failed ({type(exc).__name__}: {exc})") from None
        return text[0] if isinstance(text, list) else text

    def render(
        self,
        slices: list[Slice],
        response: str | None,
        *,
        closed: bool = False,
        ending: str | None = None,
        system: str | None = None,
    ) -> Rendered:
        """Like :meth:`PlainLayout.render`, through the chat template."""
        system = system or self.system_prompt
        if response is not None:
            return self._substitute(self._template(slices, "answer", system), slices, response)
        out = self._substitute(self._template(slices, ending == "assistant", system), slices)
        last = out.places[-1][2] if out.places else None
        if ending == "slice" or (ending is None and not closed):
            # a document left open (or continued) ends at its last slice: the turn is not closed
            cut = last if last is not None else len(out.text)
            out.text = out.text[:cut] + ("\n" if ending == "slice" else "")
        elif ending is None and last is not None:
            out.closing = last  # the turn's end markup after the last slice is the end mark
        return out

    def _template(self, slices: list[Slice], kind: bool | str, system: str) -> str:
        """The chat template's text for slices of this shape (kinds and roles; the texts are
        sentinels), with the answer's sentinel (``kind="answer"``) or with or without the
        generation prompt (``kind`` True/False). It depends on the shape alone, so it is rendered
        once per shape: jinja was half of the time collation spent on a sample."""
        key = (tuple((s.kind, s.role) for s in slices), kind, system)
        template = self._templates.get(key)
        if template is None:
            user_only = self._messages(slices, None, system)
            if kind == "answer":
                prompt = self._apply(user_only, generation_prompt=True)
                template = self._apply(self._messages(slices, "", system), generation_prompt=False)
                if not template.startswith(prompt):  # train on exactly the prompt generation gets
                    template = prompt + template[template.find(_sentinel("a")) :]
            else:
                template = self._apply(user_only, generation_prompt=bool(kind))
            if len(self._templates) >= _SHAPES_KEPT:
                self._templates.clear()
            self._templates[key] = template
        return template

    def _substitute(self, template: str, slices: list[Slice], response: str | None = None) -> Rendered:
        """The template with each sentinel replaced by its text (the answer's by ``response``),
        the image placeholders placed, checking that everything comes in slice order."""
        marks = [(m.start(), m.end(), m.group(1)) for m in _SENTINEL.finditer(template)]
        images = [(m.start(), m.end(), "image") for m in re.finditer(re.escape(self.placeholder), template)]
        pieces: list[str] = []
        out = Rendered("", [])
        length, at, n = 0, 0, 0
        for start, end, what in sorted(marks + images):
            piece = template[at:start]
            if what == "a":
                body = response or ""
                out.answer = length + len(piece)
            else:
                if n >= len(slices) or what != ("image" if slices[n].kind == "image" else str(n)):
                    raise LayoutError("its chat template does not keep the parts of a turn in their order")
                item = slices[n]
                before = slices[n - 1] if n else item
                if n and item.kind == before.kind == "text" and before.role == item.role:
                    piece += "\n"  # two text slices in a row: no token straddles them
                body = self.placeholder if item.kind == "image" else item.text
                out.places.append((item, length + len(piece), length + len(piece) + len(body)))
                n += 1
            pieces += [piece, body]
            length += len(piece) + len(body)
            at = end
        if n != len(slices) or (response is not None and out.answer is None):
            raise LayoutError(f"its chat template rendered {n} of {len(slices)} slices")
        pieces.append(template[at:])
        out.text = "".join(pieces)
        return out


PLAIN_TEMPLATE_MARK = "{#- unimm plain layout -#}"
"""How a checkpoint's chat template says it is :func:`plain_chat_template` (unimm renders that
layout itself, so it keeps choosing :class:`PlainLayout` for it)."""


def _jinja_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def plain_chat_template(tokenizer, placeholder: str, system_prompt: str = "") -> str:
    """:class:`PlainLayout` as a Jinja chat template, for a model whose processor has none.

    Checkpoints and exports of such a model carry it, so that ``apply_chat_template``,
    ``pipeline("image-text-to-text")`` and servers that read a folder's chat template (vLLM, TGI)
    prompt the model exactly as unimm trained it: a system message becomes the system prefix,
    every content part is a slice (text, or ``placeholder`` for an image), an assistant part is
    ``" ASSISTANT: {text}</s>"`` and the generation prompt is ``" ASSISTANT:"``; without a system
    message ``system_prompt`` (the checkpoint's ``model.system_prompt``) is the prefix.
    """
    bos, eos = _jinja_string(tokenizer.bos_token or ""), _jinja_string(tokenizer.eos_token or "")
    image = _jinja_string(placeholder)
    return (
        PLAIN_TEMPLATE_MARK + "{%- set ns = namespace(n=0) -%}{{- " + bos + " -}}"
        "{%- for message in messages if message['role'] == 'system' -%}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
        "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
        "{%- endif -%}{{- ' ' -}}{%- else -%}"
        + ("{{- " + _jinja_string(system_prompt + " ") + " -}}" if system_prompt else "")
        + "{%- endfor -%}{{- 'USER: ' -}}"
        "{%- for message in messages if message['role'] != 'system' -%}"
        "{%- set parts = [{'type': 'text', 'text': message['content']}] if message['content'] is string"
        " else message['content'] -%}"
        "{%- set last_message = loop.last -%}"
        "{%- for part in parts -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{{- ' ASSISTANT: ' + part['text'] + " + eos + " -}}"
        "{%- if not (last_message and loop.last) -%}{{- 'USER: ' -}}{%- endif -%}"
        "{%- else -%}"
        "{%- if ns.n > 0 -%}{{- '\\n' -}}{%- endif -%}"
        "{%- if part['type'] in ('image', 'image_url') -%}{{- " + image + " -}}"
        "{%- else -%}{{- part['text'] -}}{%- endif -%}"
        "{%- endif -%}"
        "{%- set ns.n = ns.n + 1 -%}"
        "{%- endfor -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- ' ASSISTANT:' -}}{%- endif -%}"
    )


_NO_IMAGE = object()  # rendering never looks at the image


def choose_layout(processor, placeholder: str, system_prompt: str = ""):
    """The chat template when the processor has one that keeps an interleaved sample in order,
    otherwise the plain layout (with a warning naming why)."""
    plain = PlainLayout(processor.tokenizer, placeholder, system_prompt)
    template = getattr(processor, "chat_template", None)
    if not template or (isinstance(template, str) and template.startswith(PLAIN_TEMPLATE_MARK)):
        return plain
    chat = ChatLayout(processor, placeholder, system_prompt)
    probe = [
        Slice.of_text("a"),
        Slice.of_image(_NO_IMAGE),
        Slice.of_text("b"),
        Slice.of_text("c"),
        Slice.of_image(_NO_IMAGE),
    ]
    try:
        chat.render(probe, "d")
        chat.render(probe, None, ending="assistant")
    except LayoutError as exc:
        log.warning("%s: %s; using the plain layout (USER: … ASSISTANT:)", type(processor).__name__, exc)
        return plain
    return chat
