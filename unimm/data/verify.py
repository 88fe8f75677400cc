"""Shards are checked against their manifest as they are read: streamed, no second pass.

``prepare`` records each shard's size and sha256 in ``manifest.json``. A reader opens a shard
through :class:`VerifiedShards`: the size is compared when the file is opened (a truncated or
grown shard is refused before a sample of it is used), and with ``full`` the bytes are hashed as
the tar reader consumes them and the digest compared when the shard has been read (an edited
shard stops the run at its end, naming it). ``data.verify``: ``full`` (default), ``size`` or
``off`` (a damaged shard's unreadable samples are then skipped and counted, as before).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

from unimm.errors import ShardError

VERIFY_MODES = ("full", "size", "off")

_CHUNK = 1 << 20


class _HashingReader:
    """A shard file whose bytes are hashed as they are read; :meth:`finish` checks the digest."""

    def __init__(self, url: str, expected: dict[str, Any] | None, full: bool) -> None:
        self.url = url
        self.file = open(url, "rb")  # noqa: SIM115 - closed by finish()
        self.expected = expected
        self.digest = hashlib.sha256() if full and expected and expected.get("sha256") else None

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        if self.digest is not None:
            self.digest.update(data)
        return data

    def close(self) -> None:  # the tar reader may close it; finish() still completes the check
        pass

    def finish(self) -> None:
        try:
            if self.digest is not None:
                while chunk := self.file.read(_CHUNK):  # the tar padding after the last member
                    self.digest.update(chunk)
                if self.digest.hexdigest() != self.expected["sha256"]:
                    raise ShardError(
                        f"{self.url}: its sha256 differs from the manifest's (edited or damaged since "
                        "`unimm prepare` wrote it); restore it or prepare again (data.verify=off skips "
                        "the check)"
                    )
        finally:
            self.file.close()


class VerifiedShards:
    """A webdataset stage: ``{"url"}`` dicts in, ``{"url", "stream"}`` out, each stream checked
    against the manifest (``mode``: one of :data:`VERIFY_MODES`). Picklable, for worker processes."""

    def __init__(self, expected: dict[str, dict[str, Any]], mode: str = "full") -> None:
        """``expected``: ``{url: manifest entry}`` (its ``bytes`` and ``sha256``); a shard not in
        it is read unchecked."""
        if mode not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {mode!r}")
        self.mode = mode
        self.expected = expected if mode != "off" else {}

    def __call__(self, sources: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        pending: _HashingReader | None = None
        try:
            for source in sources:
                if pending is not None:  # the previous shard has been read to its end
                    pending.finish()
                    pending = None
                url = source["url"]
                expected = self.expected.get(url)
                if expected is not None:
                    self._check_size(url, expected)
                pending = _HashingReader(url, expected, full=self.mode == "full")
                yield {**source, "stream": pending}
            if pending is not None:
                pending.finish()
                pending = None
        finally:
            if pending is not None:  # the reader stopped early: close without judging
                pending.file.close()

    @staticmethod
    def _check_size(url: str, expected: dict[str, Any]) -> None:
        try:
            size = os.stat(url).st_size
        except OSError as exc:
            raise ShardError(f"{url}: cannot read it ({exc.strerror or exc})") from None
        if "bytes" in expected and size != expected["bytes"]:
            raise ShardError(
                f"{url}: {size} bytes, but the manifest says {expected['bytes']} (truncated or "
                "replaced since `unimm prepare` wrote it); restore it or prepare again"
            )
