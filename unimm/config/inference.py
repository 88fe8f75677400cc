"""Sections of the commands that use a checkpoint: ``embed``, ``retrieve``, ``chat`` and ``eval``."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

TASKS = ("qa", "captioning", "two_choice", "retrieval", "interleaved", "winoground")
ModelDtype = Literal["auto", "float32", "bfloat16", "float16"]
SearchBackend = Literal["auto", "exact", "ann"]


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
    instruction: str | None = None
    """The instruction task (a key of the checkpoint's ``instructions``) queries and documents
    are encoded under; default: the checkpoint's ``default_instruction``; ``""``: none."""

    def validate(self) -> list[str]:
        return [] if self.model else [f"{self.section}.model: give a checkpoint with --model RUN/step-…"]

    def session_options(self) -> dict:
        """The keyword arguments of ``Session.load`` these options give."""
        return {
            "device": self.device,
            "dtype": self.model_dtype,
            "attn_implementation": self.attn_implementation,
            "instruction": self.instruction,
        }


@dataclasses.dataclass
class EmbedOptions(CheckpointOptions):
    """Section ``embed``."""

    section: ClassVar[str] = "embed"
    data: list[str] = dataclasses.field(default_factory=list)
    """Prepared shard directories (or shard files) and record files (any ``unimm prepare`` format)."""
    format: Literal["auto", "unimm", "llava", "mmc4", "csv", "parquet"] = "auto"
    """The record files' format (``auto`` detects it per file)."""
    image_root: str | None = None
    """The folder record image paths are relative to and must stay in (default: each file's folder)."""
    columns: str = ""
    """The image, text and id columns of an image–text table (see ``prepare.columns``)."""
    on_error: Literal["fail", "skip"] = "fail"
    """A bad record, unreadable image or repeated id: ``fail`` stops, ``skip`` leaves it out
    (counted in the index manifest's ``rejected``)."""
    out: str = ""
    batch_size: int = 16
    dtype: Literal["float16", "float32"] = "float16"
    """Storage dtype of the embeddings."""
    per_slice: bool = False
    """Also store an embedding after every slice (for GAK re-ranking)."""
    dim: int | None = None
    """Store vectors of this size (a Matryoshka size the checkpoint was trained for, its
    ``model.matryoshka``); default: the full size."""
    part_size: int = 10000
    max_length: int | None = None
    """Longest document in tokens; default: the checkpoint's (its training length)."""
    verify: Literal["full", "size", "off"] = "full"
    """Check each shard against its manifest as it is read (see ``data.verify``)."""
    resume: bool = False
    overwrite: bool = False
    append: bool = False
    """Add the documents to the finished index in ``out`` (same model, ids unique)."""

    def validate(self) -> list[str]:
        problems = super().validate()
        if not self.data:
            problems.append("embed.data: give record files or shard directories with --data PATH")
        if self.append and self.overwrite:
            problems.append("embed.append and embed.overwrite: choose one")
        if not self.out:
            problems.append("embed.out: give an index directory with --out DIR")
        if self.batch_size < 1 or self.part_size < 1 or (self.max_length or 16) < 16:
            problems.append("embed.batch_size and embed.part_size must be >= 1, embed.max_length >= 16")
        if self.resume and self.overwrite:
            problems.append("embed.resume and embed.overwrite: choose one")
        return problems


@dataclasses.dataclass
class DatabaseOptions(CheckpointOptions):
    """What a command that searches holds besides its index folder: a vector database."""

    db: str = ""
    """A vector database to search instead of an index folder: a Qdrant URL, or the folder of an
    embedded one (filled by ``unimm index push``)."""
    collection: str = ""
    """The collection of ``db`` to search."""
    filter: list[str] = dataclasses.field(default_factory=list)
    """``KEY=VALUE`` conditions on the documents' metadata, all of which must hold (``db`` only)."""

    def database_problems(self, index: str | None, *, required: bool) -> list[str]:
        """What is wrong with the choice between ``index`` and ``db`` (``required``: one is needed)."""
        name = self.section
        problems = []
        if index and self.db:
            problems.append(f"{name}: give an index (--index DIR) or a vector database (--db), not both")
        elif required and not index and not self.db:
            problems.append(
                f"{name}: give an index with --index DIR (made by `unimm embed`), or a vector database "
                "with --db URL|DIR --collection NAME (made by `unimm index push`)"
            )
        if self.db and not self.collection:
            problems.append(f"{name}.collection: give the collection with --collection NAME")
        if self.filter and not self.db:
            problems.append(
                f"{name}.filter: filters apply to a vector database (--db); an index folder has none"
            )
        return problems


@dataclasses.dataclass
class RetrieveOptions(DatabaseOptions):
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
    backend: SearchBackend = "auto"
    """``auto``: the index's saved ANN index (``unimm index build``) if it has one, else exact search;
    ``exact``; ``ann`` (fail without a saved ANN index)."""
    block: int = 65536
    rerank: str = "none"
    """``gak``: re-score the first-stage top-k by the normalised GAK between the query's and each
    candidate's per-slice embeddings (the index needs ``--per-slice``)."""
    rerank_delta: float = 1.0
    out: str | None = None
    qrels: str | None = None
    metrics_out: str | None = None

    def validate(self) -> list[str]:
        problems = super().validate() + self.database_problems(self.index, required=True)
        if self.db and self.rerank != "none":
            problems.append(
                "retrieve.rerank: GAK re-ranking reads an index folder's per-slice vectors; not with --db"
            )
        if not self.query and not self.queries:
            problems.append("retrieve: give a query (--query TEXT and/or --image PATH) or --queries FILE")
        if self.query and self.queries:
            problems.append("retrieve: give --query/--image or --queries, not both")
        if self.rerank not in ("none", "gak"):
            problems.append(f"retrieve.rerank: use none or gak, got {self.rerank!r}")
        if self.top_k < 1 or self.block < 1:
            problems.append("retrieve.top_k and retrieve.block must be >= 1")
        if not self.rerank_delta > 0:
            problems.append(f"retrieve.rerank_delta: must be > 0, got {self.rerank_delta}")
        return problems


@dataclasses.dataclass
class PushOptions:
    """Section ``push``: ``unimm index push``, an index into a vector database."""

    section: ClassVar[str] = "push"
    index: str = ""
    """The index folder (made by ``unimm embed``)."""
    db: str = ""
    """A Qdrant URL (``http://host:6333``), or a folder for the embedded database."""
    collection: str = ""
    """The collection to push into (created on the first push)."""
    batch_size: int = 256
    """Documents per upsert."""
    resume: bool = False
    """Skip batches already in the collection (a push that was interrupted goes on)."""

    def validate(self) -> list[str]:
        problems = [] if self.index else ["push.index: give the index folder with --index DIR"]
        if not self.db or not self.collection:
            problems.append(
                "push: give the database with --db URL|DIR and the collection with --collection NAME"
            )
        if self.batch_size < 1:
            problems.append(f"push.batch_size: must be >= 1, got {self.batch_size}")
        return problems


@dataclasses.dataclass
class IndexOptions:
    """Section ``index``: the saved ANN index of ``unimm index build`` (0 = chosen from the data)."""

    section: ClassVar[str] = "index"
    index: str = ""
    """The index folder (made by ``unimm embed``)."""
    backend: Literal["faiss-flat", "faiss-hnsw", "faiss-ivfpq"] = "faiss-hnsw"
    hnsw_m: int = 32
    """HNSW: links per node."""
    ef_construction: int = 200
    """HNSW: candidates kept while building."""
    ef_search: int = 128
    """HNSW: candidates kept while searching (recall against speed)."""
    nlist: int = 0
    """IVF-PQ: inverted lists; 0: 4·√n, at most n/39 (FAISS's training rule)."""
    pq_m: int = 0
    """IVF-PQ: sub-quantizers (bytes per vector at 8 bits), a divisor of the dimension; 0: the
    largest divisor up to d/4 (16x smaller than float32)."""
    pq_bits: int = 8
    """IVF-PQ: bits per code (fewer for an index of under 256 vectors)."""
    nprobe: int = 32
    """IVF-PQ: lists searched per query (recall against speed)."""
    rerank: int = 4
    """IVF-PQ: ``rerank`` × k candidates re-scored exactly from the stored vectors (read mapped),
    the best k kept; 0: the codes' approximate scores and order."""
    train_size: int = 0
    """IVF-PQ: vectors the quantizers are trained on; 0: min(n, 256·nlist, 100 000)."""
    checkpoint_every: int = 1_000_000
    """Vectors added between two saves of the index built so far (what ``--resume`` goes on from)."""
    resume: bool = False
    """Go on with the interrupted build in the index's ``ann/`` (the same options), not start over."""

    def validate(self) -> list[str]:
        problems = [] if self.index else ["index.index: give the index folder with --index DIR"]
        numbers = (
            "hnsw_m",
            "ef_construction",
            "ef_search",
            "nlist",
            "pq_m",
            "nprobe",
            "train_size",
            "rerank",
        )
        problems += [f"index.{k} must be >= 0" for k in numbers if getattr(self, k) < 0]
        if self.checkpoint_every < 1:
            problems.append("index.checkpoint_every must be >= 1 (vectors between saves)")
        if not 1 <= self.pq_bits <= 16 or min(self.hnsw_m, self.ef_search, self.nprobe) < 1:
            problems.append("index.pq_bits must be in 1..16; index.hnsw_m, ef_search and nprobe >= 1")
        return problems


@dataclasses.dataclass
class ChatOptions(DatabaseOptions):
    """Section ``chat``."""

    section: ClassVar[str] = "chat"
    index: str | None = None
    backend: SearchBackend = "auto"
    """How the index is searched (see ``retrieve.backend``)."""
    top_k: int = 2
    prompt: str | None = None
    images: list[str] = dataclasses.field(default_factory=list)
    max_new_tokens: int = 128
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0

    def validate(self) -> list[str]:
        problems = super().validate() + self.database_problems(self.index, required=False)
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
    benchmark: str | None = None
    """A benchmark read from its official files (``unimm eval --list``); ``data`` is then its
    folder (or annotation file) and ``tasks`` does not apply."""
    split: str = "test"
    """The benchmark's split: ``test`` (published figures) or ``val`` where the release has one."""
    rag: str | None = None
    """Retrieval-augmented evaluation of a generative benchmark: an index (``unimm embed``) whose
    ``rag_k`` nearest documents to each question are put before it."""
    rag_k: int = 2
    judge: str | None = None
    """A judged benchmark's judge: the URL of an OpenAI-compatible endpoint (its key, if it needs
    one, in ``$OPENAI_API_KEY``)."""
    judge_model: str = "gpt-4o"
    """The model the judge endpoint serves (the published figures used GPT-4: 0314 for LLaVA-W,
    0613 for MM-Vet)."""

    def validate(self) -> list[str]:
        problems = super().validate()
        if not self.data:
            problems.append("eval.data: give records or shard directories with --data PATH")
        if self.benchmark and len(self.data) > 1:
            problems.append(
                f"eval.data: --benchmark {self.benchmark} reads one folder or file, got {len(self.data)}"
            )
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            problems.append(f"eval.tasks: unknown {', '.join(unknown)} (known: {', '.join(TASKS)})")
        if self.rag and not self.benchmark:
            problems.append("eval.rag: retrieval-augmented evaluation needs --benchmark (a generative one)")
        if self.rag_k < 1:
            problems.append(f"eval.rag_k: retrieve at least one document, got {self.rag_k}")
        if self.limit < 0 or self.batch_size < 1 or self.max_new_tokens < 1:
            problems.append("eval.limit must be >= 0; eval.batch_size and eval.max_new_tokens >= 1")
        return problems


@dataclasses.dataclass
class ServeOptions(DatabaseOptions):
    """Section ``serve``: ``unimm serve``'s model, index, address, batching and request limits."""

    section: ClassVar[str] = "serve"
    index: str | None = None
    """An index to search (``/v1/search``) and to ground chat answers on."""
    backend: SearchBackend = "auto"
    """How the index is searched (see ``retrieve.backend``)."""
    host: str = "127.0.0.1"
    """The address to listen on; ``0.0.0.0`` opens the server to the network."""
    port: int = 8000
    name: str = ""
    """The model id clients ask for; default: the checkpoint's run and step (``run/step-000200``)."""
    max_batch: int = 32
    """Embedding inputs per forward pass (from concurrent requests)."""
    batch_wait_ms: float = 0.0
    """How long a batch waits for more inputs once the model is free; 0: it takes what queued
    while the previous batch ran (no added latency when idle, full batches under load)."""
    batch_refill_ms: float = 50.0
    """After a batch of n inputs, how long the next may wait for n (its clients' next requests),
    at most a tenth of that batch's time; 0: take what queued at once."""
    max_new_tokens: int = 128
    """Answer length when a request gives no ``max_tokens``."""
    max_new_tokens_limit: int = 1024
    """The most ``max_tokens`` a request may ask for."""
    max_inputs: int = 256
    """Inputs of one embeddings or search request."""
    max_request_bytes: int = 32 * 2**20
    """Bytes of one request body (base64 images included)."""
    max_image_pixels: int = 64_000_000
    """Pixels of one decoded image."""
    allow_remote_images: bool = False
    """Fetch ``http(s)://`` image URLs in requests, from public hosts only (off: images must be
    inline data URLs, and the server connects nowhere a client names)."""
    allow_private_image_hosts: bool = False
    """With ``allow_remote_images``: also fetch from loopback, private and link-local addresses
    (an image store on the server's own network; never for a server open to untrusted clients)."""
    access_log: bool = True
    """One line per request on stderr: request id, method, path, status, milliseconds, client."""

    def validate(self) -> list[str]:
        problems = super().validate() + self.database_problems(self.index, required=False)
        if not 0 < self.port < 65536:
            problems.append(f"serve.port: must be in 1..65535, got {self.port}")
        counts = ("max_batch", "max_new_tokens", "max_new_tokens_limit", "max_inputs", "max_request_bytes")
        problems += [f"serve.{k} must be >= 1" for k in counts if getattr(self, k) < 1]
        if min(self.batch_wait_ms, self.batch_refill_ms) < 0 or self.max_image_pixels < 1:
            problems.append(
                "serve.batch_wait_ms and serve.batch_refill_ms must be >= 0, serve.max_image_pixels >= 1"
            )
        if self.max_new_tokens > self.max_new_tokens_limit:
            problems.append("serve.max_new_tokens must be <= serve.max_new_tokens_limit")
        return problems


@dataclasses.dataclass
class ExportOptions(CheckpointOptions):
    """Section ``export``: ``unimm export``'s checkpoint, format and output folder."""

    section: ClassVar[str] = "export"
    format: Literal["sentence-transformers", "hf-merged"] = "sentence-transformers"
    """``sentence-transformers`` (a folder ``SentenceTransformer`` loads) or ``hf-merged`` (a plain
    transformers folder with LoRA merged, plus the retrieval head, for vLLM and other servers)."""
    out: str = ""
    overwrite: bool = False

    def validate(self) -> list[str]:
        problems = super().validate()
        return problems + ([] if self.out else ["export.out: give the output folder with --out DIR"])


@dataclasses.dataclass
class MineOptions(CheckpointOptions):
    """Section ``mine``: hard negatives for pair records from an index of the corpus."""

    section: ClassVar[str] = "mine"
    pairs: str = ""
    """Pair records (any pair format: unimm pairs, MMEB's layout, query/positive tables)."""
    index: str = ""
    """An index of the corpus built by ``unimm embed`` with the same checkpoint (from record
    files: its rows keep each document's slices, which the mined negatives are written from)."""
    out: str = ""
    """The pair records with their mined negatives (JSONL); never one of the inputs."""
    format: Literal["auto", "unimm", "csv", "mmeb", "parquet"] = "auto"
    image_root: str | None = None
    """The folder the pairs' image paths are relative to (default: the pairs file's folder);
    the mined negatives' image paths are written relative to it, so it must hold the corpus's."""
    negatives: int = 4
    """Hard negatives mined per query."""
    depth: int = 50
    """Candidates searched per query."""
    margin: float = 0.95
    """Positive-aware false-negative filter (NV-Retriever's TopK-PercPos): a candidate scoring
    above ``margin × s⁺`` (the query's score with its own positive; ``s⁺ − (1 − margin)·|s⁺|``
    when negative) is taken for an unlabelled positive and dropped."""
    filter_false_negatives: bool = True
    """Apply the ``margin`` filter (off: the best-scoring candidates that are not the record's own
    sides, false negatives and all — naive top-k mining)."""
    keep_negatives: bool = True
    """Keep the records' own negatives (the mined ones are added after them)."""
    batch_size: int = 16
    backend: SearchBackend = "auto"
    resume: bool = False
    """Go on from the records an interrupted run already wrote."""
    overwrite: bool = False

    def validate(self) -> list[str]:
        problems = super().validate()
        for key, flag in (("pairs", "--pairs"), ("index", "--index"), ("out", "--out")):
            if not getattr(self, key):
                problems.append(f"mine.{key}: give {flag}")
        if self.negatives < 1 or self.depth < self.negatives or self.batch_size < 1:
            problems.append("mine.negatives must be >= 1, mine.depth >= mine.negatives, mine.batch_size >= 1")
        if not 0 < self.margin <= 1:
            problems.append(f"mine.margin: must be in (0, 1], got {self.margin}")
        if self.resume and self.overwrite:
            problems.append("mine.resume and mine.overwrite: choose one")
        return problems
