"""The OpenAI-compatible request bodies of ``unimm serve``, checked and turned into samples.

Every problem is an :class:`ApiError` with the HTTP status and the OpenAI error shape
(``{"error": {"message", "type", "param", "code"}}``), naming the field (``input[2][1].image_url``)
and saying what to send instead. Content is what chat messages carry: a string, or a list of
parts ``{"type": "text", "text": …}`` and ``{"type": "image_url", "image_url": {"url":
"data:image/png;base64,…"}}``. Images come inline by default: the server fetches no URL and
reads no file (a URL would let any client make the server connect anywhere). ``unimm serve
--allow-remote-images`` lets it fetch ``http(s)://`` image URLs (a timeout, the request-size and
pixel limits; never ``file:``), for servers whose clients send links.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
from typing import Any

from unimm.data.samples import Sample, Slice


def error_type(status: int) -> str:
    """The OpenAI error ``type`` of an HTTP status."""
    kinds = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large"}
    return "server_error" if status >= 500 else kinds.get(status, "invalid_request_error")


class ApiError(Exception):
    """A request the server refuses: ``status`` (4xx) and an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": error_type(self.status),
                "param": self.param,
                "code": self.code,
            }
        }


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for (``serve.*``)."""

    max_inputs: int = 256
    """Inputs of one embeddings or search request."""
    max_text_chars: int = 1_000_000
    """Characters of one text part."""
    max_parts: int = 64
    """Parts (text and images) of one input or message."""
    max_image_pixels: int = 64_000_000
    """Pixels of one decoded image."""
    max_new_tokens: int = 1024
    """Tokens one chat completion may generate."""
    max_top_k: int = 100
    """Documents one search or retrieval may return."""
    max_request_bytes: int = 32 * 2**20
    """Bytes of one request body (base64 images included), and of one fetched remote image."""
    remote_images: bool = False
    """Whether ``http(s)://`` image URLs are fetched (``serve.allow_remote_images``)."""
    fetch_timeout_s: float = 10.0
    """How long fetching one remote image may take, in all."""
    private_image_hosts: bool = False
    """Whether remote images may come from loopback, private or link-local addresses."""


def _bad(message: str, param: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _fetch(url: str, where: str, limits: Limits) -> bytes:
    """The bytes behind an ``http(s)://`` image URL (:mod:`unimm.inference.fetch`)."""
    from unimm.inference.fetch import FetchRefused, fetch_image

    try:
        return fetch_image(
            url,
            timeout_s=limits.fetch_timeout_s,
            max_bytes=limits.max_request_bytes,
            private_hosts=limits.private_image_hosts,
        )
    except FetchRefused as exc:
        raise _bad(str(exc), where, "image_fetch_failed") from None


def image_bytes(url: Any, where: str, limits: Limits) -> bytes:
    """The encoded image of an ``image_url``: a data URL's payload, or (when allowed) a fetched URL."""
    if isinstance(url, str) and url.startswith(("http://", "https://")) and limits.remote_images:
        return _fetch(url, where, limits)
    if not isinstance(url, str) or not url.startswith("data:"):
        raise _bad(
            "images must be inline data URLs (data:image/png;base64,...): this server fetches no URL "
            "and reads no file unless started with --allow-remote-images (http and https only)",
            where,
        )
    header, _, payload = url.partition(",")
    if not header.endswith(";base64") or not header[5:].startswith("image/"):
        raise _bad("an image data URL must be data:image/<type>;base64,<data>", where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("the image's base64 data is not valid base64", where) from None


def decode_image(url: Any, where: str, limits: Limits):
    """An RGB image from an ``image_url``'s URL (see :func:`image_bytes`)."""
    from PIL import Image, ImageOps

    from unimm.data.images import to_rgb

    data = image_bytes(url, where, limits)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > limits.max_image_pixels:
                raise _bad(
                    f"image of {img.width}x{img.height} pixels; at most {limits.max_image_pixels}",
                    where,
                    "image_too_large",
                )
            return to_rgb(ImageOps.exif_transpose(img))
    except ApiError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _bad(f"the image cannot be decoded ({exc})", where) from None


def content_slices(content: Any, where: str, limits: Limits, role: str = "user") -> list[Slice]:
    """The slices of a message's or an input's content (a string or a list of parts)."""
    if isinstance(content, str):
        parts: list[Any] = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise _bad("content must be a string or a list of text and image_url parts", where)
    if not parts:
        raise _bad("content is empty", where)
    if len(parts) > limits.max_parts:
        raise _bad(f"{len(parts)} parts; at most {limits.max_parts}", where)
    slices = []
    for i, part in enumerate(parts):
        at = f"{where}[{i}]" if isinstance(content, list) else where
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str) or not text.strip():
                raise _bad("a text part needs a non-empty string 'text'", f"{at}.text")
            if len(text) > limits.max_text_chars:
                raise _bad(f"text of {len(text)} characters; at most {limits.max_text_chars}", f"{at}.text")
            slices.append(Slice.of_text(text, role))
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            slices.append(Slice.of_image(decode_image(url, f"{at}.image_url", limits), role))
        else:
            raise _bad("each part must be {'type': 'text', 'text': ...} or {'type': 'image_url', ...}", at)
    return slices


def inputs_of(body: dict[str, Any], key: str, limits: Limits) -> list[Sample]:
    """The samples of an embeddings (``input``) or search (``query``) body: a string, a list of
    strings, one list of content parts, or a list whose items are strings or lists of parts."""
    value = body.get(key)
    if value is None:
        raise _bad(f"'{key}' is required", key, "missing")
    if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], dict)):
        items: list[Any] = [value]
        names = [key]
    elif isinstance(value, list) and value:
        items, names = value, [f"{key}[{i}]" for i in range(len(value))]
    else:
        raise _bad(f"'{key}' must be a string, content parts, or a non-empty list of them", key)
    if len(items) > limits.max_inputs:
        raise _bad(f"{len(items)} inputs; at most {limits.max_inputs} per request", key, "too_many_inputs")
    if any(isinstance(item, int) for item in items) or any(
        isinstance(item, list) and item and isinstance(item[0], int) for item in items
    ):
        raise _bad("token ids are not accepted; send text", key, "unsupported")
    return [
        Sample.of_slices(content_slices(item, name, limits), key=f"{key}-{i}", id=str(i))
        for i, (item, name) in enumerate(zip(items, names, strict=True))
    ]


def number(body: dict[str, Any], key: str, default: Any, low: float, high: float, kind: type = float) -> Any:
    """``body[key]`` (or ``default``) checked to be a ``kind`` in ``[low, high]``."""
    value = body.get(key, default)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)  # Python's JSON reader takes NaN and Infinity
        or (kind is int and value != int(value))
    ):
        raise _bad(f"'{key}' must be {'an integer' if kind is int else 'a number'}", key)
    if not low <= value <= high:
        raise _bad(f"'{key}' must be in [{low}, {high}], got {value}", key)
    return kind(value)


@dataclasses.dataclass
class ChatRequest:
    """A checked chat-completions body."""

    question: list[Slice]
    history: list[Slice]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stream: bool
    include_usage: bool
    top_k: int
    """Documents to retrieve first (0: none)."""


UNSUPPORTED_CHAT = ("tools", "functions", "tool_choice", "logprobs", "response_format", "stop", "audio")


def chat_request(
    body: dict[str, Any], limits: Limits, *, default_tokens: int, has_index: bool
) -> ChatRequest:
    """Check a chat-completions body: the last message is the user's question, the ones before it
    the conversation. A system message's text is read as context before the conversation (the
    checkpoint keeps the system prompt it was trained with)."""
    for key in UNSUPPORTED_CHAT:
        if body.get(key) not in (None, False, [], {}):
            raise _bad(f"'{key}' is not supported by this server", key, "unsupported")
    if number(body, "n", 1, 1, 1, int) != 1:
        raise _bad("'n' must be 1", "n")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages", "missing")
    turns: list[list[Slice]] = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise _bad("each message needs a role: system, user or assistant", f"messages[{i}].role")
        speaker = "assistant" if role == "assistant" else "user"
        turns.append(content_slices(message.get("content"), f"messages[{i}].content", limits, speaker))
    if messages[-1]["role"] != "user":
        raise _bad("the last message must be the user's", f"messages[{len(messages) - 1}].role")
    retrieval = body.get("retrieval")
    if retrieval in (None, False):
        top_k = 0
    elif retrieval is True:
        top_k = 2
    elif isinstance(retrieval, dict):
        top_k = number(retrieval, "top_k", 2, 1, limits.max_top_k, int)
    else:
        raise _bad("'retrieval' must be true or {'top_k': K}", "retrieval")
    if top_k and not has_index:
        raise _bad("retrieval needs an index: start the server with --index DIR", "retrieval", "no_index")
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    stream_options = body.get("stream_options") or {}
    stream = body.get("stream", False)
    if not isinstance(stream, bool) or not isinstance(stream_options, dict):
        raise _bad("'stream' must be a boolean and 'stream_options' an object", "stream")
    return ChatRequest(
        question=turns[-1],
        history=[s for turn in turns[:-1] for s in turn],
        max_new_tokens=number(
            {"max_tokens": tokens}, "max_tokens", default_tokens, 1, limits.max_new_tokens, int
        ),
        temperature=number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=number(body, "top_p", 1.0, 1e-6, 1.0),
        seed=number(body, "seed", None, 0, 2**63 - 1, int),
        stream=stream,
        include_usage=bool(stream_options.get("include_usage", False)),
        top_k=top_k,
    )
