"""unimm: one multimodal LLM that both generates and retrieves.

The package is layered: ``unimm.data`` (records, shards, teachers), ``unimm.model`` (the model
core), ``unimm.align`` (the alignment kernel), and thin commands (``unimm.cli``) on top.
"""

__version__ = "0.1.0"
