"""Loading what ``unimm serve`` serves, and running it: in the foreground (the command) or in a
background thread on a free localhost port (tests, ``unimm bench serve``).

FastAPI and uvicorn are the ``serve`` extra; :func:`build_state` says so before importing
:mod:`unimm.inference.server`, which needs them.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from unimm.config import ServeOptions
from unimm.errors import UnimmError

API_KEY_ENV = "UNIMM_API_KEY"


def _needs(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UnimmError(f'unimm serve needs {module}: pip install "unimm[serve]"')


def build_state(opts: ServeOptions):
    """Load the session and the index, and check them, before anything listens."""
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        _needs(module)
    from unimm.inference.api import Limits
    from unimm.inference.server import ServerState
    from unimm.inference.session import Session
    from unimm.inference.vectordb import searcher_for

    session = Session.load(opts.model, **opts.session_options())
    searcher = searcher_for(opts, session)
    folder = Path(opts.model).resolve()
    limits = Limits(
        max_inputs=opts.max_inputs,
        max_new_tokens=opts.max_new_tokens_limit,
        max_request_bytes=opts.max_request_bytes,
        max_image_pixels=opts.max_image_pixels,
        remote_images=opts.allow_remote_images,
        private_image_hosts=opts.allow_private_image_hosts,
    )
    return ServerState(
        session,
        searcher,
        name=opts.name or f"{folder.parent.name}/{folder.name}",
        limits=limits,
        api_key=os.environ.get(API_KEY_ENV) or None,
        max_batch=opts.max_batch,
        batch_wait_ms=opts.batch_wait_ms,
        batch_refill_ms=opts.batch_refill_ms,
        default_tokens=opts.max_new_tokens,
    )


def make_server(state, host: str, port: int):
    """A uvicorn server for ``state`` (not started)."""
    import uvicorn

    from unimm.inference.server import create_app

    config = uvicorn.Config(create_app(state), host=host, port=port, log_level="warning", access_log=False)
    return uvicorn.Server(config)


class Background:
    """A server running in a thread on a free localhost port (tests, ``unimm bench serve``).

    ``with Background(state) as url:`` gives ``http://127.0.0.1:PORT``; leaving stops it.
    """

    def __init__(self, state) -> None:
        self.state = state
        self.server = make_server(state, "127.0.0.1", 0)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
