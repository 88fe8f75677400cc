"""The request and response bodies of ``unimm serve`` as OpenAPI schemas (``/openapi.json``,
``/docs``).

The routes read their JSON themselves (:mod:`unimm.inference.api` checks it and names the field at
fault), so FastAPI cannot infer these; they are written out here, once, and attached to the routes
with ``openapi_extra``. tests/test_serve_ops.py checks that every example in them is accepted.
"""

from __future__ import annotations

from typing import Any

_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
_IMAGE_PART = {
    "type": "object",
    "required": ["type", "image_url"],
    "properties": {
        "type": {"const": "image_url"},
        "image_url": {
            "type": "object",
            "required": ["url"],
            "properties": {
                "url": {
                    "type": "string",
                    "description": "data:image/<type>;base64,<data> (http(s) URLs only with "
                    "--allow-remote-images)",
                }
            },
        },
    },
}
_CONTENT = {
    "description": "a string, or text and image parts in order (an interleaved document)",
    "oneOf": [{"type": "string"}, {"type": "array", "items": {"oneOf": [_TEXT_PART, _IMAGE_PART]}}],
}
_INPUTS = {
    "description": "one input (a string or a list of parts) or a list of inputs",
    "oneOf": [_CONTENT, {"type": "array", "items": _CONTENT}],
}
_MODEL = {"type": "string", "description": "the served model id (GET /v1/models); optional"}

EMBEDDINGS = {
    "type": "object",
    "required": ["input"],
    "properties": {
        "input": _INPUTS,
        "model": _MODEL,
        "input_type": {"enum": ["document", "query"], "default": "document"},
        "encoding_format": {"enum": ["float", "base64"], "default": "float"},
        "dimensions": {"type": "integer", "description": "one of the model's Matryoshka sizes"},
    },
    "example": {"input": ["two red circles", "a blue square"], "input_type": "document"},
}
SEARCH = {
    "type": "object",
    "required": ["query"],
    "properties": {
        "query": _INPUTS,
        "model": _MODEL,
        "top_k": {"type": "integer", "default": 10},
        "filter": {
            "type": "object",
            "description": "metadata field → value, all of which must hold (a server started with --db)",
        },
    },
    "example": {"query": "red circles", "top_k": 3},
}
CHAT = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {"role": {"enum": ["system", "user", "assistant"]}, "content": _CONTENT},
            },
        },
        "model": _MODEL,
        "max_tokens": {"type": "integer"},
        "temperature": {"type": "number", "default": 0},
        "top_p": {"type": "number", "default": 1},
        "seed": {"type": "integer"},
        "stream": {"type": "boolean", "default": False},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "retrieval": {
            "description": "ground the answer on the index: true, or {'top_k': N}",
            "oneOf": [{"type": "boolean"}, {"type": "object", "properties": {"top_k": {"type": "integer"}}}],
        },
    },
    "example": {"messages": [{"role": "user", "content": "What is in the picture?"}], "max_tokens": 16},
}
SEARCH_RESULT = {
    "type": "object",
    "description": "one found document, in the same shape whatever the index was built from",
    "properties": {
        "id": {"type": "string"},
        "score": {"type": "number", "description": "cosine similarity"},
        "text": {"type": "string", "description": "the document's text parts, one per line"},
        "images": {"type": "integer", "description": "how many images the document has"},
        "metadata": {"type": "object", "description": "the record's meta"},
        "source": {
            "type": "object",
            "properties": {"file": {"type": ["string", "null"]}, "line": {"type": ["integer", "null"]}},
        },
    },
}
SEARCH_ANSWER = {
    "type": "object",
    "properties": {
        "object": {"const": "list"},
        "model": {"type": "string"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "index": {"type": "integer", "description": "which query"},
                    "results": {"type": "array", "items": SEARCH_RESULT},
                },
            },
        },
    },
}


def body(schema: dict[str, Any], answer: str, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads ``schema`` as JSON and answers ``answer``."""
    content: dict[str, Any] = {"application/json": {"schema": result or {"type": "object"}}}
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "responses": {"200": {"description": answer, "content": content}},
    }
