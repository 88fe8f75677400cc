"""``unimm embed``: an index of documents (one unit vector each) from prepared shards or records.

    unimm embed --model RUN/step-000200 --data shards --out index [--per-slice]
    unimm embed --model RUN/step-000200 --data captions.csv --out index [--append]

The index format and its writer are :mod:`unimm.inference.index`.
"""

from __future__ import annotations

from typing import Any

from unimm.config import EmbedConfig
from unimm.inference.index import write_index


def run(cfg: EmbedConfig, *, progress: bool = True) -> dict[str, Any]:
    """Embed every document of ``embed.data`` into ``embed.out``; return the index manifest."""
    return write_index(cfg, progress=progress)
