"""Collation: a record → token ids with image tokens, labels, slice spans and cut points.

Prompt layout (LLaVA's template, docs/method.md)::

    <s>{system} USER: {slice 1}\\n{slice 2}\\n… ASSISTANT: {response}</s>

The sample is rendered as this text (an image slice as the tokenizer's image placeholder) and the
whole text is tokenized at once, as the model's own processor does — the ids at slice boundaries
are the processor's (a byte-level BPE merges the template's space into the next word). Each image
placeholder becomes the tokens the processor makes of that image (:meth:`Collator.image_run`:
``image_seq_length`` tokens for LLaVA-1.5, a count that varies with the image's shape for
LLaVA-NeXT, marker tokens included where a family adds them); text spans come from the
tokenizer's character offsets. Earlier assistant turns (``role: assistant``) are written as
``ASSISTANT: {text}</s>USER: `` around the slice. The tokens up to a slice never depend on what
follows it (tested), so the embedding of a view is the same in training and at retrieval; a
prompt to generate from ends at ``ASSISTANT:``, and the answer's first token carries its space.

Labels (for next-token prediction, aligned with ``input_ids``; ``-100`` = ignored): the response
tokens and the closing ``</s>`` when the record has a response, otherwise every text-slice token
and a closing ``</s>`` (the document's end, when nothing was cut off).

Truncation keeps the start: a text slice may be cut short, an image never is (an image that does
not fit is dropped with everything after it); dropped slices are counted.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import random
from collections.abc import Sequence
from typing import Any, ClassVar

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
    """Token ids of the fixed template pieces for one tokenizer, each encoded on its own: what
    :meth:`Collator._fit` estimates a too-long sample's length from (the ids themselves come from
    tokenizing the whole rendered text)."""

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
        processor=None,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.image_seq_length = image_seq_length
        self.image_processor = image_processor
        self.max_length = max_length
        self.cut_points = cut_points
        self.seed = seed
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.system_prompt = system_prompt
        self.template = self._template(system_prompt)
        self.processor = processor
        self.image_placeholder = tokenizer.convert_ids_to_tokens(image_token_id)
        self._runs: dict[Any, list[int]] = {}

    PROMPT_ENDINGS: ClassVar[dict[str, str]] = {"assistant": " ASSISTANT:", "slice": "\n"}
    """How a prompt to generate from ends: before an answer, or before the document's next slice."""

    @classmethod
    def for_model(cls, model, processor, **kwargs) -> Collator:
        """A collator for a :class:`~unimm.model.core.UnimmModel` and its processor (``kwargs``: the rest).

        Raises:
            UnimmError: a model family collation does not support yet (:func:`check_model_type`).
        """
        check_model_type(model)
        return cls(
            processor.tokenizer,
            image_token_id=model.image_token_id,
            image_seq_length=model.image_seq_length,
            image_processor=processor.image_processor,
            processor=processor,
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

    def encode(self, sample: Sample, *, document_end: bool = True, ending: str | None = None) -> Encoded:
        """Encode one decoded sample: render it as text, tokenize the whole text, expand images.

        The text is tokenized in one piece, as the model's own processor does, so the ids at slice
        boundaries are the processor's; each image placeholder becomes the processor's tokens for
        that image (:meth:`image_run`). ``document_end=False`` leaves out the ``</s>`` that closes a
        document without a response; ``ending`` (``assistant`` or ``slice``) ends the text as a
        prompt does (see :meth:`prompt`).
        """
        has_response = bool(sample.response)
        # Everything is tokenized once first (the common case: it fits). Only a sample that is too
        # long is fitted from per-slice counts, and refitted in the rare case that estimate was short.
        budget = None
        for _ in range(5):
            if budget is None:
                kept, dropped, cut = list(sample.slices), 0, False
            else:
                kept, dropped, cut = self._fit(sample, budget)
            closed = (
                ending is None and document_end and not has_response and bool(kept) and not (dropped or cut)
            )
            text, places, answer = self._render(kept, sample.response if has_response else None)
            if ending is not None:
                text += self.PROMPT_ENDINGS[ending]
            if closed:
                # A document ends with </s> (as LLaVA's pre-training captions do), so that text
                # generated after its last slice learns to stop; the slice spans are unchanged.
                text += self.tokenizer.eos_token or ""
            ids, spans, labels, images = self._tokens(text, places, answer, labelled_slices=not has_response)
            if len(ids) <= self.max_length:
                break
            budget = self.max_length if budget is None else budget - (len(ids) - self.max_length)
        if closed and self.tokenizer.eos_token:
            labels[-1] = ids[-1]
        if len(ids) > self.max_length:  # only when even the answer does not fit: cut its end
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return Encoded(ids, labels, spans, images, dropped, sample.key)

    def _render(self, slices: list, response: str | None):
        """The prompt text and where each slice and the answer lie in it (character ranges).

        LLaVA-1.5's layout: ``<s>{system} USER: {slice}\n{slice}… ASSISTANT: {answer}</s>``; an
        earlier assistant turn is `` ASSISTANT: {text}</s>USER: `` around its slice.
        """
        tok = self.tokenizer
        parts = [tok.bos_token or "", f"{self.system_prompt} " if self.system_prompt else "", "USER: "]
        text = "".join(parts)
        places = []
        for n, item in enumerate(slices):
            text += " ASSISTANT: " if item.role == "assistant" else ("\n" if n > 0 else "")
            body = self.image_placeholder if item.kind == "image" else item.text
            places.append((item, len(text), len(text) + len(body)))
            text += body
            if item.role == "assistant":
                text += (tok.eos_token or "") + "USER: "
        answer = None
        if response is not None:
            # "ASSISTANT:" then " answer": the space belongs to the answer's first token, as the
            # prompt to generate from ends at the colon (see PROMPT_ENDINGS).
            text += self.PROMPT_ENDINGS["assistant"] + " "
            answer = (len(text) - 1, len(text) + len(response))
            text += response + (tok.eos_token or "")
        return text, places, answer

    def _tokens(self, text: str, places: list, answer, *, labelled_slices: bool):
        """Token ids of ``text`` with images expanded, the slice spans, labels and the images."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        flat, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        starts, ends = [x for x, _ in offsets], [y for _, y in offsets]
        ids: list[int] = []
        where: list[int] = []  # unexpanded token -> its first position in ids
        image_at = {start: item for item, start, _ in places if item.kind == "image"}
        runs: dict[int, tuple[int, int]] = {}
        for token, (a, _) in zip(flat, offsets, strict=True):
            where.append(len(ids))
            if token == self.image_token_id and a in image_at:
                run = self.image_run(image_at[a].image)
                runs[a] = (len(ids), len(ids) + len(run))
                ids.extend(run)
            else:
                ids.append(token)
        labels = [IGNORE] * len(ids)
        spans: list[tuple[int, int, int]] = []
        images = []
        for item, a, b in places:
            if item.kind == "image":
                start, end = runs[a]
                spans.append((IMAGE, start, end))
                images.append(item.image)
                continue
            # the tokens overlapping [a, b): offsets are sorted, so two binary searches
            first, last = bisect.bisect_right(ends, a), bisect.bisect_left(starts, b) - 1
            if last < first:  # whitespace merged into a neighbour: the token where the slice ends
                first = last
            start, end = where[first], where[last] + 1
            spans.append((TEXT, start, end))
            if labelled_slices and item.role != "assistant":
                labels[start:end] = ids[start:end]
        if answer is not None:  # the answer and everything after it (its </s>)
            first = bisect.bisect_right(ends, answer[0])
            labels[where[first] :] = ids[where[first] :]
        return ids, spans, labels, images

    def _fit(self, sample: Sample, max_length: int) -> tuple[list, int, bool]:
        """The slices that fit in ``max_length`` (a text slice may be cut short, an image never is),
        how many were dropped and whether the last was cut, from per-slice token counts (an upper
        bound of the whole text's)."""
        t = self.template
        used = len(t.bos) + len(t.prefix)
        if sample.response:
            used += len(t.assistant) + len(self._ids(sample.response)) + len(t.eos)
        budget = max(max_length, used + 1)
        kept = []
        for n, item in enumerate(sample.slices):
            pieces = len(t.assistant) if item.role == "assistant" else (len(t.separator) if n else 0)
            tail = len(t.eos) + len(t.user_again) if item.role == "assistant" else 0
            size = len(self.image_run(item.image)) if item.kind == "image" else len(self._ids(item.text))
            room = budget - used - pieces - tail
            if (item.kind == "image" and size > room) or (item.kind == "text" and room <= 0):
                return kept, len(sample.slices) - n, False
            if item.kind == "text" and size > room:
                cut = self.tokenizer.decode(self._ids(item.text)[:room])
                return [*kept, dataclasses.replace(item, text=cut)], len(sample.slices) - n - 1, True
            kept.append(item)
            used += pieces + size + tail
        return kept, 0, used + len(t.eos) > budget  # no room for the end mark: not complete

    def image_run(self, image) -> list[int]:
        """The tokens ``image`` becomes: the processor's expansion of one image placeholder
        (cached by image size), or ``image_seq_length`` image tokens without a processor."""
        if self.processor is None:
            return [self.image_token_id] * self.image_seq_length
        size = getattr(image, "size", None)
        if size not in self._runs:
            self._runs[size] = _expansion(self.processor, self.image_placeholder, image)
        return self._runs[size]

    def prompt(self, sample: Sample, *, after: str = "assistant") -> Encoded:
        """``sample`` (without its response) as a prompt to generate from.

        ``after="assistant"`` ends it with `` ASSISTANT:`` (answer the question), ``"slice"`` with
        the slice separator (continue the document). The tokens are exactly the prefix that
        training saw before the answer or the next slice: no ``</s>``, nothing labelled.
        """
        if after not in self.PROMPT_ENDINGS:
            raise ValueError(f"after must be one of {tuple(self.PROMPT_ENDINGS)}, got {after!r}")
        encoded = self.encode(sample.replace(response=None), document_end=False, ending=after)
        return dataclasses.replace(encoded, labels=[IGNORE] * len(encoded.input_ids))

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


SUPPORTED_TYPES = ("llava", "llava_next", "idefics3", "paligemma")
"""Model types whose training, embedding and generation are tested end to end (tiny models of
each, tests/test_families.py). Others are refused rather than fed misaligned image features."""


def check_model_type(model) -> None:
    """Refuse a model family collation does not support yet, naming it and the supported ones.

    Raises:
        UnimmError: naming the model type.
    """
    from unimm.errors import UnimmError

    model_type = model.config.model_type
    if model_type not in SUPPORTED_TYPES:
        raise UnimmError(
            f"model type {model_type!r} is not supported yet (supported: {', '.join(SUPPORTED_TYPES)}): "
            "its processor lays images out in a way unimm's collation does not handle yet"
        )


def _expansion(processor, placeholder: str, image) -> list[int]:
    """The tokens the processor puts where one image placeholder stood, markers included.

    Asked as ``"a" + placeholder + "b"``: the tokens between ``a`` and ``b`` in the processor's
    ids (it may also add tokens elsewhere, e.g. PaliGemma's closing newline).
    """
    import difflib

    probe = f"a{placeholder}b"
    plain = list(processor.tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = [int(i) for i in processor(text=[probe], images=[image], add_special_tokens=False)["input_ids"][0]]
    matcher = difflib.SequenceMatcher(None, plain, full, autojunk=False)
    mapped = {}
    for tag, i1, i2, j1, _ in matcher.get_opcodes():
        if tag == "equal":
            mapped.update({i1 + k: j1 + k for k in range(i2 - i1)})
    where = plain.index(processor.tokenizer.convert_tokens_to_ids(placeholder))
    before, after = mapped.get(where - 1), mapped.get(where + 1)
    if before is None or after is None:
        raise ValueError(f"cannot find the expansion of {placeholder!r} in the processor's output")
    return full[before + 1 : after]
