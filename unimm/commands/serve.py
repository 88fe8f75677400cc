"""``unimm serve``: the checkpoint (and optionally an index) behind an OpenAI-compatible HTTP API.

    unimm serve --model RUN/step-000200 --index index            # http://127.0.0.1:8000
    UNIMM_API_KEY=secret unimm serve --model RUN/step-000200 --host 0.0.0.0 --port 9000

The application is :mod:`unimm.inference.server`, loaded by :mod:`unimm.inference.serving`; this
command runs it under uvicorn in the foreground. It listens on localhost unless ``--host`` says
otherwise; with an API key (the ``UNIMM_API_KEY`` environment variable, kept out of recipes and
shell history) every route but ``/health`` and the OpenAPI pages (``/docs``, ``/openapi.json``)
asks for ``Authorization: Bearer KEY``. ``/metrics`` is Prometheus' scrape target; each request
gets one access-log line on stderr (:mod:`unimm.inference.monitoring`).
"""

from __future__ import annotations

from unimm.config import ServeConfig
from unimm.errors import UnimmError
from unimm.inference.serving import build_state, make_server


def _log_access_to_stderr() -> None:
    """The access log (logger ``unimm.access``) as plain lines on stderr."""
    import logging
    import sys

    from unimm.inference.monitoring import ACCESS_LOG

    if not ACCESS_LOG.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        ACCESS_LOG.addHandler(handler)
    ACCESS_LOG.setLevel(logging.INFO)
    ACCESS_LOG.propagate = False


def run(cfg: ServeConfig, *, announce=print) -> None:
    """Serve until interrupted (Ctrl-C)."""
    opts = cfg.serve
    if opts.access_log:
        _log_access_to_stderr()
    state = build_state(opts)
    server = make_server(state, opts.host, opts.port)
    index = f", index of {state.searcher.count} ({state.searcher.backend})" if state.searcher else ""
    key = " (API key required)" if state.api_key else ""
    announce(f"serving {state.name}{index} on http://{opts.host}:{opts.port}/v1{key}; Ctrl-C stops")
    try:
        server.run()
    except OSError as exc:  # the address is taken or not ours to bind
        raise UnimmError(f"cannot listen on {opts.host}:{opts.port} ({exc.strerror or exc})") from None
