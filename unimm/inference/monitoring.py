"""What an operator of ``unimm serve`` watches: Prometheus metrics, one access-log line per
request, and request ids.

Metrics (``GET /metrics``, Prometheus' text format through ``prometheus_client``, one registry
per application so two servers in a process never share counts):

- ``unimm_requests_total{route, status}`` and ``unimm_request_errors_total{route, type}``
  (the OpenAI error type of every 4xx/5xx answer);
- ``unimm_request_duration_seconds{route}``: until the response's headers (a streamed chat
  completion: its first byte);
- ``unimm_embedding_batch_size``: inputs per embedding forward pass (concurrent requests batched);
- ``unimm_embedded_inputs_total``, ``unimm_prompt_tokens_total``, ``unimm_generated_tokens_total``.

``route`` is one of the served paths, or ``other`` (so that scanning for URLs cannot grow the
label set). The access log (logger ``unimm.access``, INFO) is a logfmt line per request:
``request_id method path status duration_ms client``. A request's id is its ``X-Request-ID``
header when that is a plain token (letters, digits, ``._:-``, at most 128), else a new one; the
response carries it back in ``X-Request-ID``.
"""

from __future__ import annotations

import logging
import re
import uuid

ACCESS_LOG = logging.getLogger("unimm.access")
REQUEST_ID_HEADER = "x-request-id"
_PLAIN_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def request_id(given: str | None) -> str:
    """The id of a request: the client's ``X-Request-ID`` when it is a plain token, else new."""
    return given if given and _PLAIN_ID.match(given) else f"req-{uuid.uuid4().hex}"


class ServerMetrics:
    """The server's Prometheus metrics (see the module docs)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.routes: frozenset[str] = frozenset()
        """The application's paths (set by it): any other path is counted as ``other``."""
        self.registry = CollectorRegistry()
        where = {"registry": self.registry}
        self.requests = Counter("unimm_requests", "HTTP requests answered", ["route", "status"], **where)
        self.errors = Counter(
            "unimm_request_errors",
            "requests answered with an error, by error type",
            ["route", "type"],
            **where,
        )
        self.duration = Histogram(
            "unimm_request_duration_seconds",
            "seconds until the response headers",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            **where,
        )
        self.batch_size = Histogram(
            "unimm_embedding_batch_size", "inputs per embedding forward pass", buckets=_BATCH_BUCKETS, **where
        )
        self.embedded = Counter("unimm_embedded_inputs", "inputs embedded", **where)
        self.prompt_tokens = Counter("unimm_prompt_tokens", "prompt tokens of chat completions", **where)
        self.generated_tokens = Counter("unimm_generated_tokens", "tokens generated", **where)

    def observe_request(self, path: str, status: int, seconds: float, error_type: str | None) -> None:
        """Count one answered request."""
        route = path if path in self.routes else "other"
        self.requests.labels(route, str(status)).inc()
        self.duration.labels(route).observe(seconds)
        if error_type is not None:
            self.errors.labels(route, error_type).inc()

    def observe_batch(self, size: int) -> None:
        """Count one embedding forward pass of ``size`` inputs."""
        self.batch_size.observe(size)
        self.embedded.inc(size)

    def observe_generation(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Count one chat completion's tokens."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(completion_tokens)

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def log_access(rid: str, method: str, path: str, status: int, seconds: float, client: str | None) -> None:
    """One logfmt line for an answered request (the path percent-encoded again, so that no
    request can write a space, a quote or a newline into the log)."""
    from urllib.parse import quote

    path = quote(path, safe="/:@!$&'()*+,;=-._~")
    method = quote(method, safe="")
    ACCESS_LOG.info(
        "request_id=%s method=%s path=%s status=%d duration_ms=%.1f client=%s",
        rid,
        method,
        path,
        status,
        seconds * 1e3,
        client or "-",
    )
