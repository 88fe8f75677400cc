"""One inference session: a checkpoint loaded the way it was saved, ready to embed and generate.

    from unimm.data.samples import Sample, Slice
    from unimm.inference.session import Session

    session = Session.load("runs/tiny/step-000200")           # its saved dtype, device "auto"
    query = Sample.of_slices([Slice.of_text("two red circles")])
    vectors = session.embed_views([query])                   # [1, d], unit norm
    answer = session.generate([Sample.of_slices([Slice.of_text("What is red?")])])[0]

Everything the session needs comes from the checkpoint's own inference settings
(``unimm.json`` → ``inference``: system prompt, maximum length, dtype, pooling, embedding size),
never from the training recipe; older checkpoints get them patched in by
:func:`unimm.model.checkpoint.read_meta`. ``dtype="auto"`` loads the weights in the dtype they
were saved in, so a bf16 checkpoint of a 7B model is not inflated to float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from unimm.errors import UnimmError

if TYPE_CHECKING:
    from unimm.data.samples import Sample

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Session:
    """A loaded checkpoint on a device, with the collator its inference settings describe.

    Attributes:
        model: the :class:`~unimm.model.core.UnimmModel`, in eval mode on ``device``.
        processor: its processor; ``tokenizer`` is the processor's tokenizer.
        meta: the checkpoint's ``unimm.json`` (with ``inference`` patched in for old checkpoints).
        collator: builds batches with the checkpoint's system prompt and maximum length.
    """

    def __init__(
        self,
        model,
        processor,
        meta: dict[str, Any],
        device: torch.device,
        *,
        max_length=None,
        dim=None,
        instruction: str | None = None,
    ):
        from unimm.data.collate import Collator
        from unimm.data.instructions import chosen_task
        from unimm.model.core import check_dimension

        settings = meta["inference"]
        self.dim = check_dimension(dim, settings["dimensions"]) if dim else model.head.embed_dim
        """The size of the vectors it returns (Matryoshka: a trained size below the full one)."""
        self.model = model.to(device).eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.meta = meta
        self.device = device
        self.instructions: dict[str, dict[str, str]] = settings["instructions"]
        self.task = chosen_task(settings, instruction)
        """The instruction task queries and documents are encoded under ("" = none)."""
        self.collator = Collator.for_model(
            model,
            processor,
            max_length=max_length or settings["max_length"],
            system_prompt=settings["system_prompt"],
            instructions=self.instructions,
            default_instruction=self.task,
        )

    def instruction_for(self, role: str) -> str:
        """The instruction text the session encodes ``role`` (query or document) inputs under
        (``""``: none)."""
        from unimm.data.instructions import instruction_text

        return instruction_text(self.instructions, self.task, role) or ""

    def instruct(self, samples: list[Sample], role: str = "document") -> list[Sample]:
        """``samples`` under the session's task's ``role`` (``query`` or ``document``)
        instruction; a sample that has its own instruction text keeps it."""
        from unimm.data.instructions import instructed

        return instructed(samples, self.instructions, self.task, role)

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_length: int | None = None,
        attn_implementation: str = "auto",
        dim: int | None = None,
        instruction: str | None = None,
    ) -> Session:
        """Load ``checkpoint`` for inference.

        Args:
            checkpoint: a step folder written by ``unimm train``.
            device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
            dtype: ``auto`` (the dtype the weights were saved in), ``float32``, ``bfloat16`` or
                ``float16``.
            max_length: longest input in tokens; default: the checkpoint's (its training length).
            attn_implementation: ``auto`` (the checkpoint's, as trained), ``sdpa``, ``eager`` or
                ``flash_attention_2``.
            dim: the embedding size to return (default: the full one); a Matryoshka size the
                checkpoint was trained for (its ``inference.dimensions``), else an error.
            instruction: the instruction task (a key of the checkpoint's ``instructions``) to
                encode under; default: the checkpoint's default task; ``""``: none.

        Raises:
            UnimmError: an unknown dtype, or a checkpoint that cannot be loaded (see
                :func:`~unimm.model.checkpoint.load_checkpoint`).
        """
        from unimm.config.model import attention_problem
        from unimm.model.checkpoint import load_checkpoint, read_meta
        from unimm.utils import resolve_device

        settings = read_meta(checkpoint)["inference"]
        name = settings["dtype"] if dtype == "auto" else dtype
        if name not in DTYPES:
            raise UnimmError(f"dtype {name!r}: use auto, {', '.join(DTYPES)}")
        attention = (
            settings.get("attn_implementation", "sdpa")
            if attn_implementation == "auto"
            else attn_implementation
        )
        if why := attention_problem(attention):
            raise UnimmError(f"attn_implementation {attention!r}: {why}")
        model, processor, meta = load_checkpoint(
            checkpoint, dtype=DTYPES[name], attn_implementation=attention
        )
        return cls(
            model,
            processor,
            meta,
            resolve_device(device),
            max_length=max_length,
            dim=dim,
            instruction=instruction,
        )

    def embed_views(self, samples: list[Sample], role: str = "document") -> torch.Tensor:
        """Unit float32 embeddings ``[n, d]`` on the CPU, one per sample: the view cut after its
        last slice (how documents and queries are embedded, as in training), each under the
        ``role`` (``document`` or ``query``) instruction of the session's task."""
        return self.embed_counted(samples, role)[0]

    def embed_counted(self, samples: list[Sample], role: str = "document") -> tuple[torch.Tensor, list[int]]:
        """:meth:`embed_views` and each sample's length in tokens."""
        from unimm.model.core import truncate

        vectors, lengths = embed_last_views(self.model, self.collator, self.instruct(samples, role))
        return truncate(vectors, self.dim), lengths

    @torch.no_grad()
    def embed_slices(self, samples: list[Sample], role: str = "document") -> list[torch.Tensor]:
        """Per sample, the unit embeddings ``[slices, d]`` of its views cut after every slice, in
        order (the last row is :meth:`embed_views`' vector); for per-slice indexes and GAK
        re-ranking. Slices cut by the maximum length have no row."""
        batch = self.collator(self.instruct(samples, role))
        counts = [len(s) for s in batch["spans"]]
        batch["views"] = [(b, c) for b, n in enumerate(counts) for c in range(n)]
        from unimm.model.core import truncate

        return list(torch.split(truncate(self.model.embed(batch).float().cpu(), self.dim), counts))

    @torch.no_grad()
    def generate(
        self,
        prompts: list[Sample],
        *,
        after: str = "assistant",
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        streamer=None,
    ) -> list[str]:
        """Continuations of ``prompts`` (their responses ignored), batched with left padding.

        ``after="assistant"`` ends each prompt where the answer starts (answer it), ``"slice"`` with
        the slice separator (continue the document). Greedy unless ``temperature > 0`` (then
        nucleus sampling with ``top_p``). ``streamer`` (a ``transformers`` streamer; one prompt
        only) receives the tokens as they are generated. Returns the decoded texts, stripped.
        """
        if streamer is not None and len(prompts) != 1:
            raise ValueError("a streamer takes one prompt at a time")
        new, _ = self._generate_ids(prompts, after, max_new_tokens, temperature, top_p, streamer)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]

    def generate_counted(self, prompt: Sample, **options: Any) -> tuple[str, dict[str, int]]:
        """One prompt's continuation (options as :meth:`generate`) and its token counts:
        ``{"prompt_tokens", "completion_tokens"}`` (generated tokens up to the end, padding not
        counted)."""
        options = {"after": "assistant", "max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0} | options
        new, longest = self._generate_ids(
            [prompt],
            options["after"],
            options["max_new_tokens"],
            options["temperature"],
            options["top_p"],
            options.get("streamer"),
        )
        row = new[0]
        produced = int((row != self.collator.pad_id).sum()) if self.collator.pad_id is not None else len(row)
        text = self.tokenizer.decode(row, skip_special_tokens=True).strip()
        return text, {"prompt_tokens": longest, "completion_tokens": produced}

    @torch.no_grad()
    def _generate_ids(self, prompts, after, max_new_tokens, temperature, top_p, streamer):
        """The generated token ids ``[n, new]`` and the padded prompt length."""
        # a prompt is no retrieval query: the system prompt, not an instruction
        encoded = [
            self.collator.prompt(p if p.instruction is not None else p.replace(instruction=""), after=after)
            for p in prompts
        ]
        batch = self.collator.batch(encoded, pad_left=True)
        longest = batch["input_ids"].shape[1]
        if temperature > 0:
            sampling: dict[str, Any] = {"do_sample": True, "temperature": temperature, "top_p": top_p}
        else:
            sampling = {"do_sample": False}
        out = self.model.generate(
            batch["input_ids"].to(self.device),
            batch["attention_mask"].to(self.device),
            batch["image_inputs"],
            max_new_tokens=max_new_tokens,
            pad_token_id=self.collator.pad_id,
            **({"streamer": streamer} if streamer is not None else {}),
            **sampling,
        )
        return out[:, longest:], longest


@torch.no_grad()
def embed_last_views(model, collator, samples: list[Sample]) -> tuple[torch.Tensor, list[int]]:
    """Unit float32 CPU embeddings of ``samples``, each the view cut after its last slice, and
    each sample's length in tokens: the one definition of a document's vector, for a loaded
    session and for the model being trained (its benchmarks during training)."""
    batch = collator(samples)
    batch["views"] = [(b, len(s) - 1) for b, s in enumerate(batch["spans"])]
    return model.embed(batch).float().cpu(), batch["attention_mask"].sum(1).tolist()
