"""Collation: a record → token ids with image tokens, labels, slice spans and cut points.

Prompt layout (LLaVA's template, docs/method.md)::

    <s>{system} USER: {slice 1}\\n{slice 2}\\n… ASSISTANT: {response}</s>

Each text slice is encoded on its own (so its token span is exact) and each image slice becomes
``image_seq_length`` image tokens, which the LLaVA model replaces by the projected vision
features in order. Earlier assistant turns (``role: assistant``) are written as
``ASSISTANT: {text}</s>USER: `` around the slice. The prefix up to the last slice never depends on
the response, so the embedding of a view is the same in training and at retrieval.

Labels (for next-token prediction, aligned with ``input_ids``; ``-100`` = ignored): the response
tokens and the closing ``</s>`` when the record has a response, otherwise every text-slice token
and a closing ``</s>`` (the document's end, when nothing was cut off).

Truncation keeps the start: a text slice may be cut short, an image never is (an image that does
not fit is dropped with everything after it); dropped slices are counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Sequence
from typing import Any

import torch

from unimm.data.samples import Sample

IGNORE = -100
TEXT, IMAGE = 0, 1


@dataclasses.dataclass
class Encoded:
    """One record as tokens.

    ``spans`` holds ``(kind, start, end)`` token ranges of the kept slices; ``images`` the kept
    image slices (PIL images or tensors) in order; ``dropped`` how many slices did not fit.
    """

    input_ids: list[int]
    labels: list[int]
    spans: list[tuple[int, int, int]]
    images: list[Any]
    dropped: int = 0
    key: str = ""


@dataclasses.dataclass
class TemplateTokens:
    """Token ids of the fixed template pieces for one tokenizer."""

    bos: list[int]
    prefix: list[int]  # system prompt + " USER: "
    separator: list[int]  # between slices
    assistant: list[int]  # " ASSISTANT: "
    eos: list[int]
    user_again: list[int]  # "USER: " after an earlier assistant turn


class Collator:
    """Encodes records and collates them into batches for the model.

    Args:
        tokenizer: the model's tokenizer.
        image_token_id: the id the model replaces with image features.
        image_seq_length: image tokens per image.
        image_processor: turns images into the model's image inputs (``pixel_values``, ...).
        max_length: longest sequence in tokens.
        system_prompt: text before ``USER:``.
        cut_points: views per sample (``P``); the last kept slice is always one of them.
        seed: seeds the choice of cut points (per sample, from its key, so it is reproducible).
    """

    def __init__(
        self,
        tokenizer,
        *,
        image_token_id: int,
        image_seq_length: int,
        image_processor=None,
        max_length: int = 2048,
        system_prompt: str = "",
        cut_points: int = 4,
        seed: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.image_seq_length = image_seq_length
        self.image_processor = image_processor
        self.max_length = max_length
        self.cut_points = cut_points
        self.seed = seed
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.template = self._template(system_prompt)

    @classmethod
    def for_model(cls, model, processor, **kwargs) -> Collator:
        """A collator for a :class:`~unimm.model.core.UnimmModel` and its processor (``kwargs``: the rest).

        Raises:
            UnimmError: the processor lays images out otherwise than this collator does (see
                :func:`check_image_layout`).
        """
        check_image_layout(model, processor)
        return cls(
            processor.tokenizer,
            image_token_id=model.image_token_id,
            image_seq_length=model.image_seq_length,
            image_processor=processor.image_processor,
            **kwargs,
        )

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _template(self, system_prompt: str) -> TemplateTokens:
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        system = f"{system_prompt} " if system_prompt else ""
        return TemplateTokens(
            bos=bos,
            prefix=self._ids(f"{system}USER: "),
            separator=self._ids("\n"),
            assistant=self._ids(" ASSISTANT: "),
            eos=eos,
            user_again=self._ids("USER: "),
        )

    # -----------------------------------------------------------------------------------------

    def encode(self, sample: Sample, *, document_end: bool = True) -> Encoded:
        """Encode one decoded sample.

        ``document_end=False`` leaves out the ``</s>`` that closes a document without a response
        (for prompts, see :meth:`prompt`).
        """
        t = self.template
        ids: list[int] = [*t.bos, *t.prefix]
        labels: list[int] = [IGNORE] * len(ids)
        spans: list[tuple[int, int, int]] = []
        images: list[Any] = []
        slices = sample.slices
        has_response = bool(sample.response)
        response_ids = [*self._ids(sample.response), *t.eos] if has_response else []
        # Room for the answer comes first: the prompt is cut before the answer is.
        budget = self.max_length - (len(t.assistant) + len(response_ids) if has_response else 0)
        budget = max(budget, len(ids) + 1)
        dropped = 0
        for n, item in enumerate(slices):
            pieces: list[int] = list(t.separator) if n > 0 else []
            if item.role == "assistant":
                pieces = [*t.assistant]
            if item.kind == "image":
                body = [self.image_token_id] * self.image_seq_length
            else:
                body = self._ids(item.text)
            tail = [*t.eos, *t.user_again] if item.role == "assistant" else []
            room = budget - len(ids) - len(pieces)
            if item.kind == "image" and len(body) > room:
                dropped = len(slices) - n
                break
            if item.kind == "text" and room <= 0:
                dropped = len(slices) - n
                break
            if item.kind == "text" and len(body) > room:
                body = body[:room]
                tail = []
            ids.extend(pieces)
            labels.extend([IGNORE] * len(pieces))
            start = len(ids)
            ids.extend(body)
            if item.kind == "text" and not has_response and item.role != "assistant":
                labels.extend(body)
            else:
                labels.extend([IGNORE] * len(body))
            spans.append((IMAGE if item.kind == "image" else TEXT, start, len(ids)))
            if item.kind == "image":
                images.append(item.image)
            ids.extend(tail)
            labels.extend([IGNORE] * len(tail))
            if len(ids) >= budget:
                dropped = len(slices) - n - 1
                break
        complete = spans and dropped == 0 and len(ids) + len(t.eos) <= self.max_length
        if document_end and not has_response and complete:
            # A document ends with </s> (as LLaVA's pre-training captions do), so that text
            # generated after its last slice learns to stop; the slice spans are unchanged.
            ids.extend(t.eos)
            labels.extend(t.eos)
        if has_response:
            ids.extend(t.assistant)
            labels.extend([IGNORE] * len(t.assistant))
            room = max(0, self.max_length - len(ids))
            answer = response_ids[:room]
            ids.extend(answer)
            labels.extend(answer)
        return Encoded(ids, labels, spans, images, dropped, sample.key)

    def prompt(self, sample: Sample, *, after: str = "assistant") -> Encoded:
        """``sample`` (without its response) as a prompt to generate from.

        ``after="assistant"`` ends it with `` ASSISTANT: `` (answer the question), ``"slice"`` with
        the slice separator (continue the document). The tokens are exactly the prefix that
        training saw before the answer or the next slice: no ``</s>``, nothing labelled.
        """
        encoded = self.encode(sample.replace(response=None), document_end=False)
        tail = self.template.assistant if after == "assistant" else self.template.separator
        ids = encoded.input_ids + tail
        return dataclasses.replace(encoded, input_ids=ids, labels=[IGNORE] * len(ids))

    def cuts(self, encoded: Encoded) -> list[int]:
        """Up to ``cut_points`` slice indices to embed (sorted), always including the last kept slice.

        Chosen at random but reproducibly: the generator is seeded by the collator's seed and
        the sample's key, so a resumed or distributed run picks the same views.
        """
        n = len(encoded.spans)
        if n == 0:
            return []
        digest = hashlib.sha256(f"{self.seed}/{encoded.key}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "little"))
        others = rng.sample(range(n - 1), min(self.cut_points - 1, n - 1)) if self.cut_points > 1 else []
        return sorted({*others, n - 1})

    def image_inputs(self, images: list[Any]) -> dict[str, torch.Tensor] | None:
        """Everything the image processor returns for ``images`` (``pixel_values`` and, per family,
        ``image_sizes``, ``image_grid_thw``, ``pixel_attention_mask``, ...), for the model's
        forward; ``None`` without images."""
        if not images:
            return None
        if self.image_processor is None:
            raise ValueError("records have images but the collator has no image processor")
        return dict(self.image_processor(images=images, return_tensors="pt"))

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Any]:
        """Collate decoded samples into a batch (right-padded)."""
        encoded = [self.encode(s) for s in samples]
        return self.batch(encoded, samples)

    def batch(self, encoded: list[Encoded], samples: Sequence[Sample] | None = None) -> dict[str, Any]:
        longest = max(len(e.input_ids) for e in encoded)
        size = len(encoded)
        input_ids = torch.full((size, longest), self.pad_id, dtype=torch.long)
        labels = torch.full((size, longest), IGNORE, dtype=torch.long)
        attention = torch.zeros((size, longest), dtype=torch.long)
        views: list[tuple[int, int]] = []  # (sample, slice index of the cut)
        for b, e in enumerate(encoded):
            input_ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[b, : len(e.labels)] = torch.tensor(e.labels)
            attention[b, : len(e.input_ids)] = 1
            views.extend((b, c) for c in self.cuts(e))
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "image_inputs": self.image_inputs([img for e in encoded for img in e.images]),
            "spans": [e.spans for e in encoded],
            "views": views,
            "dropped_slices": sum(e.dropped for e in encoded),
        }
        if samples is not None:
            batch["teacher"] = [s.teacher for s in samples]
            batch["ids"] = [s.id for s in samples]
        return batch


def check_image_layout(model, processor) -> None:
    """Refuse a model whose processor gives an image other tokens than this collator would.

    The collator writes ``image_seq_length`` image tokens per image (LLaVA-1.5's layout; PaliGemma
    counts the same way). Families whose processors make the count depend on the image (LLaVA-NeXT,
    Qwen-VL, Idefics3 tiles, Mistral 3) or pool to another count (Gemma 3, InternVL) would be fed
    misaligned image features, so they are refused with what their processor does instead. Asked of
    the processor itself, for two image shapes.

    Raises:
        UnimmError: naming the model type and both counts.
    """
    from PIL import Image

    from unimm.errors import UnimmError

    image_token = processor.tokenizer.convert_ids_to_tokens(model.image_token_id)
    counts = set()
    for size in ((64, 48), (40, 96)):
        try:
            ids = processor(text=[image_token], images=[Image.new("RGB", size)])["input_ids"][0]
        except Exception as exc:  # a processor that cannot even expand one image
            counts.add(f"an error ({type(exc).__name__}: {exc})")
            continue
        counts.add(sum(1 for i in ids if int(i) == model.image_token_id))
    if counts != {model.image_seq_length}:
        found = " and ".join(str(c) for c in sorted(counts, key=str))
        raise UnimmError(
            f"model type {model.config.model_type!r}: its processor turns an image into {found} image "
            f"token(s), while unimm's collation lays out {model.image_seq_length} per image (LLaVA-1.5's "
            "layout); this family is not supported yet (supported: llava, paligemma)"
        )
