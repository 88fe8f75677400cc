"""``unimm chat``: talk to a checkpoint (one-shot or a REPL), optionally grounded on an index.

    unimm chat --model RUN/step-000200                       # REPL: /image PATH, /reset, /exit
    unimm chat --model RUN/step-000200 --prompt "What colour?" --image a.png
    unimm chat --model RUN/step-000200 --index index --top-k 2 --prompt "Which shapes are red?"

The session and the retrieval-augmented prompt are :mod:`unimm.inference.chat`.
"""

from __future__ import annotations

from unimm.config import ChatConfig
from unimm.inference.chat import one_shot, repl


def run(cfg: ChatConfig, *, quiet: bool = False) -> str | None:
    """Answer ``chat.prompt`` and return the answer, or run the REPL on stdin when there is none
    (``quiet``: answers only, no banner or retrieved-document lines)."""
    if cfg.chat.prompt is not None:
        return one_shot(cfg.chat, quiet=quiet)
    repl(cfg.chat, quiet=quiet)
    return None
