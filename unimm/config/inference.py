"""Sections of the commands that use a checkpoint: ``embed``, ``retrieve``, ``chat`` and ``eval``."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

TASKS = ("qa", "captioning", "two_choice", "retrieval", "interleaved", "winoground")
ModelDtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclasses.dataclass
class CheckpointOptions:
    """What every section of a command that loads a checkpoint holds (one place for its defaults)."""

    section: ClassVar[str] = ""
    model: str = ""
    """A checkpoint folder written by `unimm train` (RUN/step-…)."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    model_dtype: ModelDtype = "auto"
    """Dtype the checkpoint is loaded in; ``auto``: the dtype its weights were saved in."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernels; ``auto``: the checkpoint's (as trained)."""

    def validate(self) -> list[str]:
        return [] if self.model else [f"{self.section}.model: give a checkpoint with --model RUN/step-…"]


@dataclasses.dataclass
class EmbedOptions(CheckpointOptions):
    """Section ``embed``."""

    section: ClassVar[str] = "embed"
    data: list[str] = dataclasses.field(default_factory=list)
    """Prepared shard directories (or shard files)."""
    out: str = ""
    batch_size: int = 16
    dtype: Literal["float16", "float32"] = "float16"
    """Storage dtype of the embeddings."""
    per_slice: bool = False
    """Also store an embedding after every slice (for GAK re-ranking)."""
    part_size: int = 10000
    max_length: int | None = None
    """Longest document in tokens; default: the checkpoint's (its training length)."""
    verify: Literal["full", "size", "off"] = "full"
    """Check each shard against its manifest as it is read (see ``data.verify``)."""
    resume: bool = False
    overwrite: bool = False

    def validate(self) -> list[str]:
        problems = super().validate()
        if not self.data:
            problems.append("embed.data: give shard directories with --data DIR")
        if not self.out:
            problems.append("embed.out: give an index directory with --out DIR")
        if self.batch_size < 1 or self.part_size < 1 or (self.max_length or 16) < 16:
            problems.append("embed.batch_size and embed.part_size must be >= 1, embed.max_length >= 16")
        if self.resume and self.overwrite:
            problems.append("embed.resume and embed.overwrite: choose one")
        return problems


@dataclasses.dataclass
class RetrieveOptions(CheckpointOptions):
    """Section ``retrieve``."""

    section: ClassVar[str] = "retrieve"
    index: str = ""
    query: list[list[str]] = dataclasses.field(default_factory=list)
    """One interleaved query as ``[kind, value]`` pairs (``text`` or ``image``), from the CLI."""
    queries: str | None = None
    """A file of query records."""
    format: str = "auto"
    image_root: str | None = None
    top_k: int = 10
    backend: str = "exact"
    """``exact`` (blocked matrix products), ``faiss-flat`` (exact, FAISS) or ``faiss-hnsw`` (approximate)."""
    block: int = 65536
    rerank: str = "none"
    """``gak``: re-score the first-stage top-k by the normalised GAK between the query's and each
    candidate's per-slice embeddings (the index needs ``--per-slice``)."""
    rerank_delta: float = 1.0
    out: str | None = None
    qrels: str | None = None
    metrics_out: str | None = None

    def validate(self) -> list[str]:
        problems = super().validate()
        if not self.index:
            problems.append("retrieve.index: give an index with --index DIR (made by `unimm embed`)")
        if not self.query and not self.queries:
            problems.append("retrieve: give a query (--query TEXT and/or --image PATH) or --queries FILE")
        if self.query and self.queries:
            problems.append("retrieve: give --query/--image or --queries, not both")
        if self.backend not in ("exact", "faiss-flat", "faiss-hnsw"):
            problems.append(f"retrieve.backend: use exact, faiss-flat or faiss-hnsw, got {self.backend!r}")
        if self.rerank not in ("none", "gak"):
            problems.append(f"retrieve.rerank: use none or gak, got {self.rerank!r}")
        if self.top_k < 1 or self.block < 1:
            problems.append("retrieve.top_k and retrieve.block must be >= 1")
        if not self.rerank_delta > 0:
            problems.append(f"retrieve.rerank_delta: must be > 0, got {self.rerank_delta}")
        return problems


@dataclasses.dataclass
class ChatOptions(CheckpointOptions):
    """Section ``chat``."""

    section: ClassVar[str] = "chat"
    index: str | None = None
    top_k: int = 2
    prompt: str | None = None
    images: list[str] = dataclasses.field(default_factory=list)
    max_new_tokens: int = 128
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0

    def validate(self) -> list[str]:
        problems = super().validate()
        if self.top_k < 1 or self.max_new_tokens < 1:
            problems.append("chat.top_k and chat.max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            problems.append("chat.temperature must be >= 0 and chat.top_p in (0, 1]")
        if self.images and self.prompt is None:
            problems.append("chat: --image needs --prompt (in the REPL, attach images with /image PATH)")
        return problems


@dataclasses.dataclass
class EvalOptions(CheckpointOptions):
    """Section ``eval``."""

    section: ClassVar[str] = "eval"
    data: list[str] = dataclasses.field(default_factory=list)
    """Record files (any ``unimm prepare`` input format) or shard directories."""
    format: str = "auto"
    image_root: str | None = None
    tasks: list[str] = dataclasses.field(default_factory=lambda: list(TASKS))
    limit: int = 0
    """At most this many items per task (0 = all)."""
    batch_size: int = 16
    max_new_tokens: int = 16
    out: str | None = None
    """Write the results as JSON here."""

    def validate(self) -> list[str]:
        problems = super().validate()
        if not self.data:
            problems.append("eval.data: give records or shard directories with --data PATH")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            problems.append(f"eval.tasks: unknown {', '.join(unknown)} (known: {', '.join(TASKS)})")
        if self.limit < 0 or self.batch_size < 1 or self.max_new_tokens < 1:
            problems.append("eval.limit must be >= 0; eval.batch_size and eval.max_new_tokens >= 1")
        return problems
