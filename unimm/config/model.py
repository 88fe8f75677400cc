"""Sections of the model and how it learns: ``model`` (which model, which parts train, LoRA),
``align`` (the structure-induced targets) and ``train`` (losses, optimisation, checkpoints)."""

from __future__ import annotations

import dataclasses
from typing import Literal

TRACKERS = ("tensorboard", "wandb", "mlflow")
"""What ``train.report_to`` names (accelerate's trackers)."""

ATTENTION = ("sdpa", "eager", "flash_attention_2")
"""Attention implementations a model may load with (``model.attn_implementation``)."""


def attention_problem(name: str) -> str | None:
    """Why ``name`` cannot be used here (unknown, or FlashAttention 2 without its package), or None."""
    import importlib.util

    if name not in ATTENTION:
        return f"use one of {', '.join(ATTENTION)}"
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        return "it needs the flash-attn package (pip install flash-attn) and a CUDA GPU; use sdpa"
    return None


INSTRUCTION_ROLES = ("query", "document")


def instruction_problems(table: dict[str, dict[str, str]], default: str, where: str = "model") -> list[str]:
    """What is wrong with an instructions table and its default task (empty when nothing)."""
    problems = []
    for task, texts in table.items():
        unknown = sorted(set(texts) - set(INSTRUCTION_ROLES))
        if unknown:
            problems.append(
                f"{where}.instructions.{task}: unknown key(s) {', '.join(unknown)} "
                f"(known: {', '.join(INSTRUCTION_ROLES)})"
            )
        empty = [role for role, text in texts.items() if role in INSTRUCTION_ROLES and not text.strip()]
        if empty or not texts:
            problems.append(f"{where}.instructions.{task}: give a non-empty query and/or document text")
    if default and default not in table:
        known = ", ".join(sorted(table)) or "none"
        problems.append(
            f"{where}.default_instruction: {default!r} is not a task of {where}.instructions (known: {known})"
        )
    return problems


@dataclasses.dataclass
class ModelOptions:
    """Section ``model``."""

    path: str | None = None
    """Local Hugging Face image-text-to-text folder (e.g. a LLaVA-1.5 checkpoint)."""
    tiny: bool = False
    """Build the tiny random LLaVA instead (its tokenizer trained on the training texts)."""
    pooling: Literal["paper", "last"] = "paper"
    embed_dim: int = 256
    matryoshka: list[int] = dataclasses.field(default_factory=list)
    """Smaller embedding sizes trained alongside ``embed_dim`` (Matryoshka: the alignment loss is
    averaged over the full vector and each leading ``d`` components, re-normalised), so that
    ``unimm embed --dim d`` and ``dimensions`` on ``/v1/embeddings`` serve shorter vectors."""
    system_prompt: str = ""
    instructions: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    """Task instructions, ``{TASK: {query: TEXT, document: TEXT}}`` (VLM2Vec / E5-V style): a
    record (or pair record) naming ``instruction: TASK`` is encoded under them, a pair's query
    under the query text and every other side under the document text. Kept in the checkpoint and
    applied by embed, retrieve, serve and the exports (docs/formats.md)."""
    default_instruction: str = ""
    """The task (a key of ``instructions``) of records that name none, and of ``embed``,
    ``retrieve`` and ``serve`` when not told another (empty: none)."""
    max_length: int = 2048
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the weights are loaded in (mixed precision is train.mixed_precision)."""
    trust_remote_code: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernels for training and (recorded in the checkpoint) inference;
    ``flash_attention_2`` needs the flash-attn package and a CUDA GPU."""
    lora: bool = True
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names inside the language model that get LoRA adapters."""
    train_projector: bool = False
    """Also train the vision–language connector (opt-in: the paper trains the LoRA adapters and
    the retrieval head only; a random tiny model or a new connector needs it)."""
    train_vision: bool = False
    train_lm: bool = False
    """Fine-tune the whole language model (only without LoRA)."""

    def validate(self) -> list[str]:
        problems = []
        if self.path is None and not self.tiny:
            problems.append(
                "model.path: give a local model folder (--set model.path=DIR), or model.tiny=true"
            )
        if self.path is not None and self.tiny:
            problems.append("model.path and model.tiny: choose one")
        if self.embed_dim < 1 or self.max_length < 16 or self.lora_r < 1:
            problems.append("model.embed_dim, model.lora_r must be >= 1 and model.max_length >= 16")
        bad = [d for d in self.matryoshka if not isinstance(d, int) or not 0 < d < self.embed_dim]
        if bad or len(set(self.matryoshka)) != len(self.matryoshka):
            problems.append(
                f"model.matryoshka: different sizes each between 1 and model.embed_dim - 1 "
                f"({self.embed_dim - 1}), got {self.matryoshka}"
            )
        problems += instruction_problems(self.instructions, self.default_instruction)
        if self.lora and self.train_lm:
            problems.append("model.train_lm: full fine-tuning of the language model is for lora=false")
        if why := attention_problem(self.attn_implementation):
            problems.append(f"model.attn_implementation={self.attn_implementation}: {why}")
        return problems


@dataclasses.dataclass
class AlignOptions:
    """How the structure-induced targets are computed (section ``align``; docs/method.md)."""

    delta: float = 1.0
    """Bandwidth scale δ (the paper gives no value)."""
    sigma: float | str = "length_scaled"
    """``length_scaled`` (σ = δ·sqrt((n+m)/2), the paper's), ``fixed`` (σ = δ; enables prefix
    sharing, one DP table per sample pair) or a number (σ itself)."""
    normalize: bool = True
    """Normalised K̃ ∈ (0, 1] (raw K grows with length)."""
    single_slice: Literal["cosine", "gak"] = "cosine"
    teacher: Literal["triple", "clip", "mean"] = "triple"
    """``triple`` (default), ``clip`` (the paper's "w/o TK"), ``mean`` (its "w/o GAK")."""

    def validate(self) -> list[str]:
        problems = []
        if not self.delta > 0:
            problems.append(f"align.delta: must be > 0, got {self.delta}")
        if isinstance(self.sigma, str) and self.sigma not in ("length_scaled", "fixed"):
            problems.append(f"align.sigma: use length_scaled, fixed or a number, got {self.sigma!r}")
        if not isinstance(self.sigma, str) and not self.sigma > 0:
            problems.append(f"align.sigma: a number must be > 0, got {self.sigma}")
        return problems


@dataclasses.dataclass
class TrainOptions:
    """Section ``train``."""

    alpha: float = 1.0
    """Weight of the discriminative loss (0 = generative only)."""
    gen_weight: float = 1.0
    """Weight of the generative loss (0 = discriminative only)."""
    disc_loss: Literal["mse", "infonce", "kl"] = "mse"
    temperature: float = 0.05
    pair_weight: float = 1.0
    """Weight of the pair loss ``L_p`` (InfoNCE of pair records' queries against their positives,
    in-batch positives and hard negatives; 0 = pairs train nothing)."""
    pair_temperature: float = 0.02
    """``τ`` of the pair loss (VLM2Vec's 0.02)."""
    hard_negatives: int = 1
    """Hard negatives per pair record in a batch (chosen afresh each epoch from the record's;
    0 = in-batch negatives only)."""
    lr: float = 1e-4
    head_lr: float | None = None
    """Learning rate of the retrieval head (default: ``lr``)."""
    lora_lr: float | None = None
    """Learning rate of the LoRA adapters (default: ``lr``)."""
    projector_lr: float | None = None
    """Learning rate of the vision–language connector, when trained (default: ``lr``)."""
    optimizer: Literal["adamw", "adam", "sgd", "adafactor"] = "adamw"
    """torch's AdamW (fused when the trained parameters are on CUDA), Adam, SGD (momentum 0.9) or
    Adafactor."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after the linear warm-up (``warmup_ratio`` of the steps): cosine or linear to 0, or
    constant."""
    weight_decay: float = 0.0
    """Decoupled weight decay of the matrices; biases and normalisation weights take none."""
    warmup_ratio: float = 0.03
    max_steps: int = 1000
    epochs: float = 0.0
    """Train for this many passes over ``data.train`` instead (0 = ``max_steps`` decides):
    ``max_steps`` becomes ceil(epochs × samples / (processes × batch_size × grad_accum)), recorded
    in the checkpoints' recipe."""
    batch_size: int = 8
    """Samples per device per step."""
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    """Clip the gradient's norm to this (0 = no clipping)."""
    mixed_precision: Literal["no", "auto", "bf16", "fp16"] = "no"
    """Autocast precision; ``auto`` picks bf16 on a GPU that has it, fp16 on an older GPU, no on a CPU."""
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 1
    save_every: int = 500
    keep_last: int = 2
    max_nonfinite: int = 10
    """Consecutive steps with a non-finite loss before training stops."""
    eval_every: int = 0
    """Evaluate data.eval every this many steps (0 = never)."""
    eval_batches: int = 4
    benchmarks: dict[str, str] = dataclasses.field(default_factory=dict)
    """Benchmarks run every ``eval_every`` steps: name → the release's folder (``unimm eval
    --list``), e.g. ``{coco: data/coco}``; logged as ``coco/text_to_image/R@1``."""
    benchmark_split: str = "val"
    """The held-out split they are scored on (Karpathy's ``val``; ``test`` where that is all a
    release has, which makes its test figures optimistic)."""
    benchmark_limit: int = 0
    """Examples per benchmark (0 = all)."""
    best_metric: str = ""
    """A logged figure (``coco/text_to_image/R@1``, ``eval_loss_disc``): ``RUN/best`` then links
    the checkpoint of the step where it was best, kept however old."""
    best_mode: Literal["max", "min"] = "max"
    grad_cache_chunk: int = 0
    """Gradient caching: samples per forward chunk (0 = off). The step's gradient is exactly the
    full batch's, while memory holds one chunk's activations, so batch_size (and with it the
    number of views in L_d) can grow past what fits at once."""
    merge_lora: bool = False
    """Fold LoRA adapters into the weights of the final checkpoint."""
    report_to: list[str] = dataclasses.field(default_factory=list)
    """Trackers that get every line of ``metrics.jsonl`` too (losses, learning rate, throughput,
    evaluations), through accelerate: ``tensorboard`` (event files in ``RUN/trackers/NAME``),
    ``wandb`` (``WANDB_MODE=offline`` writes ``RUN/wandb``), ``mlflow`` (``MLFLOW_TRACKING_URI``,
    else a file store in ``RUN/mlruns``); several at once. Empty or ``[none]``: the JSONL alone."""
    run_name: str = ""
    """The trackers' project, experiment and run name (default: the run folder's name)."""

    def validate(self) -> list[str]:
        problems = []
        unknown = [t for t in self.report_to if t not in (*TRACKERS, "none")]
        if unknown or ("none" in self.report_to and len(self.report_to) > 1):
            problems.append(
                f"train.report_to: {', '.join(unknown) or 'none with others'}; give any of "
                f"{', '.join(TRACKERS)}, or none"
            )
        if self.alpha < 0 or self.gen_weight < 0 or (self.alpha == 0 and self.gen_weight == 0):
            problems.append("train.alpha and train.gen_weight: non-negative and not both 0")
        for key in (
            "max_steps",
            "batch_size",
            "grad_accum",
            "log_every",
            "save_every",
            "keep_last",
            "max_nonfinite",
        ):
            if getattr(self, key) < 1:
                problems.append(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0:
            problems.append(f"train.lr: must be > 0, got {self.lr}")
        for key in ("head_lr", "lora_lr", "projector_lr"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                problems.append(f"train.{key}: must be > 0 (or unset for train.lr), got {value}")
        if self.epochs < 0:
            problems.append(f"train.epochs: must be >= 0 (0 = train.max_steps decides), got {self.epochs}")
        if self.weight_decay < 0 or not 0 <= self.warmup_ratio < 1:
            problems.append("train.weight_decay must be >= 0 and train.warmup_ratio in [0, 1)")
        if self.grad_cache_chunk < 0:
            problems.append(f"train.grad_cache_chunk: must be >= 0 (0 = off), got {self.grad_cache_chunk}")
        if self.eval_every < 0 or self.eval_batches < 1:
            problems.append("train.eval_every must be >= 0 (0 = never) and train.eval_batches >= 1")
        if (self.benchmarks or self.best_metric) and self.eval_every == 0:
            problems.append(
                "train.benchmarks and train.best_metric run every train.eval_every steps: set it > 0"
            )
        if self.benchmark_limit < 0:
            problems.append(f"train.benchmark_limit: must be >= 0 (0 = all), got {self.benchmark_limit}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"train.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if not self.temperature > 0:
            problems.append(f"train.temperature: must be > 0, got {self.temperature}")
        if not self.pair_temperature > 0 or self.pair_weight < 0 or self.hard_negatives < 0:
            problems.append(
                "train.pair_temperature must be > 0, train.pair_weight and train.hard_negatives >= 0"
            )
        if self.weight_decay < 0:
            problems.append(f"train.weight_decay: must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm < 0:
            problems.append(f"train.max_grad_norm: must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        if self.seed < 0:
            problems.append(f"train.seed: must be >= 0, got {self.seed}")
        return problems
