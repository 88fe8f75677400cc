"""Sections of the data side: ``prepare`` (records → shards), ``teachers`` (their features in the
shards) and ``data`` (shards → training batches)."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass
class PrepareOptions:
    """Options of ``unimm prepare`` (section ``prepare``)."""

    inputs: list[str] = dataclasses.field(default_factory=list)
    """Record files (JSONL, LLaVA JSON/JSONL, MMC4 JSONL, CSV/TSV)."""
    out: str = ""
    """Output shard directory."""
    format: Literal["auto", "unimm", "llava", "mmc4", "csv", "mmeb", "parquet"] = "auto"
    """Input format; ``auto`` decides per file from its extension and first record."""
    task: Literal["records", "both", "generative", "discriminative"] = "records"
    """Which losses the inputs' records train: ``records`` (each record's own ``task``, default
    ``both``), or one for every record of these inputs (e.g. ``generative`` for instruction data,
    ``discriminative`` for image–text pairs: the paper's data_g and data_d)."""
    image_root: str | None = None
    """Folder image paths are relative to (and must stay inside); default: each input's folder."""
    columns: str = ""
    """Which columns of an image–text table (CSV/TSV, Parquet, datasets folder, imagefolder) are
    the image, the text and the id: ``image=COL,text=COL,id=COL`` (default: ``image``/``file_name``,
    ``caption``/``text``, ``id``)."""
    samples_per_shard: int = 1000
    max_shard_bytes: int = 1 << 30
    """A shard is closed before it would pass this size (a single larger sample gets its own)."""
    image_size: int | None = None
    """Shorter image side after resizing (aspect kept, never upscaled); ``None`` keeps the size."""
    jpeg_quality: int = 90
    workers: int = 1
    """Processes that decode, check and resize images (1 = in the main process)."""
    on_error: Literal["fail", "skip"] = "fail"
    """``skip`` leaves bad records out and lists them in ``DIR/rejects.jsonl``."""
    verify_images: Literal["full", "header"] = "full"
    """``full`` decodes every image (catches truncated or corrupt data); ``header`` only parses
    the header, which is faster but lets a corrupt body through to training."""
    max_image_pixels: int = 89_478_485
    """Decompression-bomb limit in pixels (Pillow's default)."""
    max_record_depth: int = 32
    """Deepest JSON nesting of one record (a record needs 4)."""
    max_number_digits: int = 64
    """Most digits of one JSON number."""
    max_text_chars: int = 1_000_000
    """Longest string field (text, path, id) or CSV field, in characters."""
    max_slices: int = 4096
    """Most slices of one record."""
    resume: bool = False
    """Keep complete shards of an interrupted run (checked by sha256) and redo the rest."""
    overwrite: bool = False
    """Replace an existing prepared directory."""

    def validate(self) -> list[str]:
        problems = []
        if not self.inputs:
            problems.append("prepare.inputs: give at least one input file")
        if not self.out:
            problems.append("prepare.out: give an output directory with --out DIR")
        limits = ("max_record_depth", "max_number_digits", "max_text_chars", "max_slices")
        for key in ("samples_per_shard", "max_shard_bytes", "workers", "max_image_pixels", *limits):
            if getattr(self, key) < 1:
                problems.append(f"prepare.{key}: must be >= 1, got {getattr(self, key)}")
        if self.image_size is not None and self.image_size < 8:
            problems.append(f"prepare.image_size: must be >= 8 pixels (or unset), got {self.image_size}")
        if not 1 <= self.jpeg_quality <= 100:
            problems.append(f"prepare.jpeg_quality: must be in 1..100, got {self.jpeg_quality}")
        if self.resume and self.overwrite:
            problems.append("prepare.resume and prepare.overwrite: choose one of them")
        return problems


@dataclasses.dataclass
class TeacherOptions:
    """Frozen teacher encoders whose features ``prepare`` stores (section ``teachers``)."""

    image_expert: str | None = None
    """Local directory of an image encoder loadable by ``AutoModel`` (DINOv2, a CLIP or SigLIP
    vision tower, or a whole dual encoder: its image half)."""
    text_expert: str | None = None
    """Local directory of a text encoder loadable by ``AutoModel`` (BERT, XLM-R, BGE, E5, ...)."""
    text_pooling: Literal["cls", "mean"] = "cls"
    """How the text expert's tokens become one vector: ``cls`` (BGE) or ``mean`` (E5, GTE)."""
    clip: str | None = None
    """Local directory of the cross-modal teacher: a dual encoder with image and text features in
    one space (CLIP, SigLIP, SigLIP 2)."""
    device: str = "cpu"
    batch_size: int = 32
    text_max_length: int = 512
    """Longest text (in tokens) given to the text expert; CLIP is capped by its own limit."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint directory; off unless you trust that directory."""

    def validate(self) -> list[str]:
        problems = []
        if self.batch_size < 1:
            problems.append(f"teachers.batch_size: must be >= 1, got {self.batch_size}")
        if self.text_max_length < 1:
            problems.append(f"teachers.text_max_length: must be >= 1, got {self.text_max_length}")
        experts = (self.image_expert is None, self.text_expert is None)
        if experts[0] != experts[1]:
            problems.append(
                "teachers: give both --teacher-image-expert and --teacher-text-expert (the triple "
                "kernel needs an expert per modality), or neither"
            )
        if self.image_expert is not None and self.clip is None:
            problems.append(
                "teachers.clip: the triple kernel compares an image with a text through CLIP; "
                "add --teacher-clip PATH"
            )
        return problems

    @property
    def enabled(self) -> bool:
        return self.clip is not None


@dataclasses.dataclass
class DataOptions:
    """Section ``data``."""

    train: list[str] = dataclasses.field(default_factory=list)
    """Prepared shard directories (``unimm prepare`` outputs)."""
    weights: list[float] = dataclasses.field(default_factory=list)
    """Mixing weight per directory (default: equal)."""
    eval: list[str] = dataclasses.field(default_factory=list)
    """Shard directories evaluated every train.eval_every steps (fixed batches, no shuffle)."""
    shuffle_buffer: int = 256
    prefetch: int = 2
    """Batches decoded and collated ahead (0 = in the training loop): on a background thread, or
    per worker process when ``workers > 0``."""
    workers: int = 0
    """Worker processes that decode and collate batches (0 = none). The batches and their order
    are the same for any number of workers, so resuming and changing it are both exact."""
    cut_points: int = 4
    """Views per sample (the paper's P); the last slice is always one of them."""
    task_fraction: dict[str, float] = dataclasses.field(default_factory=dict)
    """Keep only this fraction of each task's data (the paper's "w/o data_g" / "w/o data_d"):
    ``{generative: 0.5}`` keeps the next-token loss of half the records that train it (chosen per
    record key and seed, the same every epoch): the others of them that are generative-only are
    skipped, those tagged ``both`` train the alignment loss only."""
    verify: Literal["full", "size", "off"] = "full"
    """Check each shard against its manifest as it is read: ``full`` (its size when opened, its
    sha256 streamed as it is read), ``size``, or ``off`` (a damaged shard's unreadable samples are
    then skipped and counted)."""

    def validate(self) -> list[str]:
        problems = []
        if not self.train:
            problems.append("data.train: give at least one shard directory (--set data.train=DIR)")
        if self.weights and len(self.weights) != len(self.train):
            problems.append(f"data.weights: {len(self.weights)} weights for {len(self.train)} directories")
        if any(w <= 0 for w in self.weights):
            problems.append("data.weights: every weight must be > 0")
        if self.prefetch < 0:
            problems.append(f"data.prefetch: must be >= 0 (0 = off), got {self.prefetch}")
        if self.workers < 0:
            problems.append(f"data.workers: must be >= 0 (0 = no worker processes), got {self.workers}")
        if self.workers > 0 and self.prefetch == 0:
            problems.append("data.prefetch: must be >= 1 with data.workers > 0 (batches ahead per worker)")
        if self.cut_points < 1:
            problems.append(f"data.cut_points: must be >= 1, got {self.cut_points}")
        for task, fraction in self.task_fraction.items():
            if task not in ("generative", "discriminative"):
                problems.append(f"data.task_fraction.{task}: the tasks are generative and discriminative")
            elif not isinstance(fraction, int | float) or not 0 < fraction <= 1:
                problems.append(f"data.task_fraction.{task}: a fraction in (0, 1], got {fraction!r}")
        return problems
