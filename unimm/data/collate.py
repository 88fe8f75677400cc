"""Collation: a record → token ids with image tokens, labels, slice spans and cut points.

The processor decides the tokens. A layout (:mod:`unimm.data.layout`: the model's chat template,
or LLaVA-1.5's plain ``USER: … ASSISTANT:`` layout for a model without one) renders the sample as
text with one image placeholder per image; each placeholder is replaced by the text the
processor's own ``replace_image_token`` gives for that image (``image_seq_length`` image tokens
for LLaVA-1.5; a count that varies with the image's shape for LLaVA-NeXT or Qwen-VL; tiles and
marker tokens for Idefics3, InternVL or Gemma 3 — asked once per image size,
:meth:`Collator.image_text`), and the whole text is tokenized at once, exactly as the processor's
``__call__`` does. Text spans come from the tokenizer's character offsets, image spans from the
replaced range; the tokens up to a slice never depend on what follows it (tested per family), so
the embedding of a view is the same in training and at retrieval.

Labels (for next-token prediction, aligned with ``input_ids``; ``-100`` = ignored): the response
tokens and the turn's end after them when the record has a response, otherwise every text-slice
token and the document's end mark (``</s>``, or the template's end of turn) when nothing was cut.

Truncation keeps the start: a text slice may be cut short, an image never is (an image that does
not fit is dropped with everything after it); dropped slices are counted.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import random
from collections.abc import Sequence
from typing import Any

import torch

from unimm.data.instructions import instruction_text
from unimm.data.pairs import expand_pairs, pair_views
from unimm.data.samples import Sample
from unimm.utils import seed_of

log = logging.getLogger(__name__)

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
    epoch: int = 0
    task: str = "both"


class Collator:
    """Encodes records and collates them into batches for the model.

    Args:
        tokenizer: the model's tokenizer.
        image_token_id: the id the model replaces with image features.
        image_seq_length: image tokens per image, when there is no processor to ask.
        image_processor: turns images into the model's image inputs (``pixel_values``, ...).
        max_length: longest sequence in tokens.
        system_prompt: the system text (a system message under a chat template).
        cut_points: views per sample (``P``); the last kept slice is always one of them.
        seed: seeds the choice of cut points (per sample, from its key, so it is reproducible).
        processor: the model's processor: its image placeholder, image expansion, chat template
            and per-token image type ids (without one: the plain layout and a fixed image length).
        by_task: training's batches: a sample tagged ``discriminative`` gets no next-token targets
            and one tagged ``generative`` no views (evaluation scores every sample both ways).
        instructions: ``model.instructions`` (task → query/document instruction text); a sample
            without its own ``instruction`` text gets the document instruction of the task its
            record names; a pair's sides that of its task, or of ``default_instruction``, its
            query the query instruction.
        hard_negatives: how many of a pair record's negatives join the batch (chosen afresh each
            epoch, reproducibly, as the cut points are).
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
        by_task: bool = False,
        instructions: dict[str, dict[str, str]] | None = None,
        default_instruction: str = "",
        hard_negatives: int = 1,
    ) -> None:
        from unimm.data.layout import PlainLayout, choose_layout

        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.image_seq_length = image_seq_length
        self.image_processor = image_processor
        self.max_length = max_length
        self.cut_points = cut_points
        self.seed = seed
        self.by_task = by_task
        self.instructions = instructions or {}
        self.default_instruction = default_instruction
        self.hard_negatives = hard_negatives
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.processor = processor
        self.placeholder = getattr(processor, "image_token", None) or tokenizer.convert_ids_to_tokens(
            image_token_id
        )
        if processor is None:
            self.layout = PlainLayout(tokenizer, self.placeholder, system_prompt)
        else:
            self.layout = choose_layout(processor, self.placeholder, system_prompt)
        self._image_texts: dict[Any, str] = {}
        self._token_type_key: str | None = None
        self._control = _control_tokens(tokenizer)

    @classmethod
    def for_model(cls, model, processor, **kwargs) -> Collator:
        """A collator for a :class:`~unimm.model.core.UnimmModel` and its processor (``kwargs``: the rest).

        Raises:
            UnimmError: a processor that cannot say how it expands an image (:func:`check_processor`).
        """
        check_processor(model, processor)
        return cls(
            processor.tokenizer,
            image_token_id=model.image_token_id,
            image_seq_length=0,  # the processor says how long each image is
            image_processor=processor.image_processor,
            processor=processor,
            **kwargs,
        )

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    # -----------------------------------------------------------------------------------------

    def encode(self, sample: Sample, *, document_end: bool = True, ending: str | None = None) -> Encoded:
        """Encode one decoded sample: render it, expand its images, tokenize the whole text.

        ``document_end=False`` leaves a document without a response open (no end mark);
        ``ending`` (``assistant`` or ``slice``) ends the text as a prompt does (see :meth:`prompt`).
        """
        sample = self._literal(self._instructed(sample))
        response = sample.response or None
        # Everything is tokenized once first (the common case: it fits). Only a sample that is too
        # long is fitted from its slices' token counts, and refitted in the rare case that was short.
        kept, dropped, cut = list(sample.slices), 0, False
        sizes = None
        for _ in range(5):
            closed = ending is None and document_end and bool(kept) and not (dropped or cut)
            rendered = self._render(sample, kept, response, closed=closed, ending=ending)
            ids, spans, labels, images = self._tokens(rendered, labelled_slices=response is None)
            if len(ids) <= self.max_length:
                break
            if sizes is None:  # measured on the whole sample
                sizes, budget = _token_layout(spans, len(ids), len(kept)), self.max_length
            else:
                budget -= len(ids) - self.max_length
            kept, dropped, cut = self._fit(sample, sizes, budget, has_response=response is not None)
        if len(ids) > self.max_length:  # the answer or the template itself does not fit: cut the end
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            whole = [n for n, (_, _, end) in enumerate(spans) if end <= self.max_length]
            dropped += len(spans) - len(whole)
            spans, images = (
                spans[: len(whole)],
                images[: sum(kind == IMAGE for kind, _, _ in spans[: len(whole)])],
            )
        return Encoded(ids, labels, spans, images, dropped, sample.key, sample.epoch, sample.task)

    def _instructed(self, sample: Sample) -> Sample:
        """``sample`` with its instruction text: its own (``""`` = none), else the document
        instruction of the task its record names (records that name none have none: the default
        task is for pairs and for inference)."""
        if sample.instruction is not None:
            return sample
        text = instruction_text(self.instructions, sample.instruction_name, "document")
        return sample if text is None else sample.replace(instruction=text)

    def _literal(self, sample: Sample) -> Sample:
        """``sample`` with the tokenizer's control tokens inside its texts made literal: a
        document that contains ``<image>`` or ``<|im_end|>`` as text would otherwise become an
        image placeholder without an image (a crash in the model) or end its turn. A zero-width
        space after the first character keeps the text readable and splits the token."""
        if self._control is None:
            return sample

        def literal(text: str) -> str:
            return self._control.sub(lambda m: m.group(0)[0] + "\u200b" + m.group(0)[1:], text)

        touched = any(s.kind == "text" and self._control.search(s.text) for s in sample.slices)
        if not touched and not (sample.response and self._control.search(sample.response)):
            return sample
        slices = [
            dataclasses.replace(s, text=literal(s.text)) if s.kind == "text" else s for s in sample.slices
        ]
        return sample.replace(slices=slices, response=literal(sample.response) if sample.response else None)

    def _render(self, sample: Sample, kept: list, response: str | None, **how):
        from unimm.data.layout import LayoutError
        from unimm.errors import UnimmError

        try:
            return self.layout.render(kept, response, system=sample.instruction, **how)
        except LayoutError as exc:
            where = f" ({sample.source})" if sample.source else ""
            raise UnimmError(f"sample {sample.key!r}{where}: {exc}") from None

    def _tokens(self, rendered, *, labelled_slices: bool):
        """Token ids of the rendered text with images expanded, the slice spans, labels, images."""
        text, places, answer, closing = self._expand(rendered)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        starts, ends = [x for x, _ in offsets], [y for _, y in offsets]

        def tokens(a: int, b: int) -> tuple[int, int]:
            # the tokens overlapping [a, b): offsets are sorted, so two binary searches
            first, last = bisect.bisect_right(ends, a), bisect.bisect_left(starts, b) - 1
            if last < first:  # whitespace merged into a neighbour: the token where the range ends
                first = last
            return first, last + 1

        labels = [IGNORE] * len(ids)
        spans: list[tuple[int, int, int]] = []
        images = []
        for item, a, b in places:
            start, end = tokens(a, b)
            if item.kind == "image":
                spans.append((IMAGE, start, end))
                images.append(item.image)
                continue
            spans.append((TEXT, start, end))
            if labelled_slices and item.role != "assistant":
                labels[start:end] = ids[start:end]
        for begin in (answer, closing):  # the answer, or the document's end mark, to the end
            if begin is not None and begin < len(text):
                first = bisect.bisect_right(ends, begin)
                labels[first:] = ids[first:]
        return ids, spans, labels, images

    def _expand(self, rendered):
        """The rendered text with every image placeholder replaced by the processor's text for
        that image, and the places, answer and end mark moved along."""
        pieces, places, at, shift = [], [], 0, 0
        moved = []  # (old position, shift after it), to move the answer and the end mark
        for item, a, b in rendered.places:
            if item.kind != "image":
                places.append((item, a + shift, b + shift))
                continue
            body = self.image_text(item.image)
            pieces += [rendered.text[at:a], body]
            places.append((item, a + shift, a + shift + len(body)))
            shift += len(body) - (b - a)
            moved.append((b, shift))
            at = b
        pieces.append(rendered.text[at:])

        def move(position):
            if position is None:
                return None
            return position + next((s for old, s in reversed(moved) if old <= position), 0)

        return "".join(pieces), places, move(rendered.answer), move(rendered.closing)

    def _fit(self, sample: Sample, sizes, budget: int, *, has_response: bool) -> tuple[list, int, bool]:
        """The slices that fit in ``budget`` tokens (a text slice may be cut short, an image never
        is), how many were dropped and whether the last was cut, from the token counts measured on
        the whole sample (``sizes``, :func:`_token_layout`)."""
        head, gaps, lengths, tail = sizes
        used = head + (tail if has_response else 0)
        budget = max(budget, used + 1)
        kept = []
        for n, item in enumerate(sample.slices):
            room = budget - used - gaps[n]
            if (item.kind == "image" and lengths[n] > room) or (item.kind == "text" and room <= 0):
                return kept, len(sample.slices) - n, False
            if item.kind == "text" and lengths[n] > room:
                cut = self.tokenizer.decode(self._ids(item.text)[:room])
                return [*kept, dataclasses.replace(item, text=cut)], len(sample.slices) - n - 1, True
            kept.append(item)
            used += gaps[n] + lengths[n]
        return kept, 0, not has_response and used + tail > budget  # no room for the end mark

    def image_text(self, image) -> str:
        """The text that stands for ``image``: what the processor puts in place of one image
        placeholder (asked once per image size), or ``image_seq_length`` placeholders without one."""
        if self.processor is None:
            return self.placeholder * self.image_seq_length
        size = getattr(image, "size", None)
        if size not in self._image_texts:
            out = self.processor(
                text=[self.placeholder], images=[image], return_text_replacement_offsets=True
            )
            replaced = out.get("text_replacement_offsets") or [[]]
            if len(replaced[0]) != 1:
                raise ValueError(f"{type(self.processor).__name__} did not report how it expands an image")
            self._image_texts[size] = replaced[0][0]["replacement"]
            self._token_type_key = _token_type_key(self.processor, out)
        return self._image_texts[size]

    def prompt(self, sample: Sample, *, after: str = "assistant") -> Encoded:
        """``sample`` (without its response) as a prompt to generate from.

        ``after="assistant"`` ends it where the answer starts (`` ASSISTANT:``, or the chat
        template's generation prompt), ``"slice"`` with the slice separator (continue the
        document). The tokens are exactly the prefix that training saw before the answer or the
        next slice: no end mark, nothing labelled.
        """
        from unimm.data.layout import ENDINGS

        if after not in ENDINGS:
            raise ValueError(f"after must be one of {ENDINGS}, got {after!r}")
        encoded = self.encode(sample.replace(response=None), document_end=False, ending=after)
        return dataclasses.replace(encoded, labels=[IGNORE] * len(encoded.input_ids))

    def cuts(self, encoded: Encoded) -> list[int]:
        """Up to ``cut_points`` slice indices to embed (sorted), always including the last kept slice.

        Chosen at random but reproducibly: the generator is seeded by the collator's seed, the
        sample's key and the epoch that drew it, so each epoch sees other prefixes (the paper
        samples them afresh) while a resumed or distributed run picks the same views.
        """
        n = len(encoded.spans)
        if n == 0:
            return []
        salt = f"{self.seed}/{encoded.key}" + (f"/{encoded.epoch}" if encoded.epoch else "")
        rng = random.Random(seed_of(salt))
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
        out = self.image_processor(images=images, return_tensors="pt")
        # only what the processor itself hands the model (not Gemma 3's num_crops or InternVL's
        # num_patches, which only count tokens)
        names = getattr(self.processor, "model_input_names", None)
        return {key: value for key, value in out.items() if names is None or key in names}

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Any]:
        """Collate decoded samples into a batch (right-padded). A pair record becomes several
        rows (its query, its positive, up to ``hard_negatives`` negatives), and the batch's
        ``pairs`` lists ``(query view, positive view, [negative views])`` of each."""
        rows, sides = expand_pairs(samples, self)
        encoded = [self.encode(s) for s in rows]
        batch = self.batch(encoded, rows)
        if sides:
            batch["pairs"] = pair_views(batch["views"], sides)
            batch["tasks"] = [s.task for s in samples]  # a pair counts once
        return batch

    def batch(
        self, encoded: list[Encoded], samples: Sequence[Sample] | None = None, *, pad_left: bool = False
    ) -> dict[str, Any]:
        """Pad encoded samples into a batch: ids, mask, labels, the model's image inputs (with
        the per-token image type ids the family's processor returns, e.g. Qwen-VL's
        ``mm_token_type_ids``), spans and views. ``pad_left`` pads on the left, as generation does."""
        longest = max(len(e.input_ids) for e in encoded)
        size = len(encoded)
        input_ids = torch.full((size, longest), self.pad_id, dtype=torch.long)
        labels = torch.full((size, longest), IGNORE, dtype=torch.long)
        attention = torch.zeros((size, longest), dtype=torch.long)
        views: list[tuple[int, int]] = []  # (sample, slice index of the cut)
        spans = []
        for b, e in enumerate(encoded):
            at = longest - len(e.input_ids) if pad_left else 0
            row = slice(at, at + len(e.input_ids))
            input_ids[b, row] = torch.tensor(e.input_ids)
            if not self.by_task or e.task != "discriminative":  # the alignment loss only: no targets
                labels[b, row] = torch.tensor(e.labels)
            attention[b, row] = 1
            spans.append([(kind, start + at, end + at) for kind, start, end in e.spans])
            if not self.by_task or e.task != "generative":  # the next-token loss only: no views
                views.extend((b, c) for c in self.cuts(e))
        images = self.image_inputs([img for e in encoded for img in e.images])
        if images is not None and self._token_type_key is not None:
            types = self.processor.create_mm_token_type_ids(input_ids.tolist())
            images[self._token_type_key] = torch.tensor(types, dtype=torch.long)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "image_inputs": images,
            "spans": spans,
            "views": views,
            "dropped_slices": sum(e.dropped for e in encoded),
            "tasks": [e.task for e in encoded],
        }
        if samples is not None:
            batch["teacher"] = [s.teacher for s in samples]
            batch["ids"] = [s.id for s in samples]
        return batch


TESTED_TYPES = (
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "idefics3",
    "gemma3",
    "paligemma",
    "internvl",
)
"""Model types whose training, embedding and generation are tested end to end with a tiny model
of each (tests/test_families.py); others that pass :func:`check_processor` run with a warning."""


def check_processor(model, processor) -> None:
    """Refuse a model whose processor cannot say how it lays out an image, naming what is missing.

    Raises:
        UnimmError: no image token in the model's config, or a processor without an image
            placeholder (``image_token``) or without ``replace_image_token``.
    """
    from transformers.processing_utils import ProcessorMixin

    from unimm.errors import UnimmError

    name = type(processor).__name__
    model.image_token_id  # noqa: B018 - raises a clear error when the config names none
    missing = [part for part in ("tokenizer", "image_processor") if getattr(processor, part, None) is None]
    if not isinstance(getattr(processor, "image_token", None), str):
        missing.append("image_token (the image placeholder in text)")
    if getattr(type(processor), "replace_image_token", None) in (None, ProcessorMixin.replace_image_token):
        missing.append("replace_image_token (how an image placeholder is expanded)")
    if missing:
        raise UnimmError(f"processor {name} has no {', '.join(missing)}: unimm cannot lay out its images")
    model_type = model.config.model_type
    if model_type not in TESTED_TYPES:
        log.warning(
            "model type %r is not among the families unimm tests (%s); its processor's own image "
            "expansion is used",
            model_type,
            ", ".join(TESTED_TYPES),
        )


def _control_tokens(tokenizer):
    """A pattern of the tokenizer's special and added tokens (longest first), or None."""
    import re

    names = set(getattr(tokenizer, "all_special_tokens", []) or [])
    if hasattr(tokenizer, "get_added_vocab"):
        names |= set(tokenizer.get_added_vocab() or {})
    # whitespace runs some tokenizers add as tokens are text, not control
    names = sorted(
        (n for n in names if isinstance(n, str) and len(n) > 1 and n.strip()), key=len, reverse=True
    )
    return re.compile("|".join(map(re.escape, names))) if names else None


def _token_type_key(processor, out) -> str | None:
    """The per-token image type ids the processor returns with its ids, if any: Qwen-VL's
    ``mm_token_type_ids`` (which its M-RoPE positions need), Gemma 3's ``token_type_ids``
    (bidirectional attention within an image). PaliGemma's ``token_type_ids`` mark a prefix-LM
    prefix instead; unimm keeps every model causal (a view's embedding depends only on its
    prefix), so they are not passed."""
    if "mm_token_type_ids" in out:
        return "mm_token_type_ids"
    if "token_type_ids" in out and getattr(processor, "return_mm_token_type_ids", False):
        return "token_type_ids"
    return None


def _token_layout(spans: list[tuple[int, int, int]], total: int, count: int):
    """``(head, gaps, lengths, tail)`` token counts of a whole sample: before its first slice,
    between each slice and the one before it, of each slice, after its last slice."""
    if not spans:
        return total, [0] * count, [0] * count, 0
    gaps = [0] + [start - previous_end for (_, _, previous_end), (_, start, _) in itertools.pairwise(spans)]
    lengths = [end - start for _, start, end in spans]
    return spans[0][1], gaps, lengths, total - spans[-1][2]
