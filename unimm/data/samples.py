"""The decoded sample: what every reader gives and every consumer takes, from shards to collation.

A :class:`Sample` is one record after ``prepare`` (or a record file read for evaluation, or a
question typed at ``unimm chat``): its interleaved :class:`Slice` list, the optional response, and
the teacher features stored beside it. Shard reading (:func:`unimm.data.shards.decode_sample`),
record files (:func:`unimm.data.adapters.load_decoded_records`), collation, the index writer,
evaluation, retrieval and chat all pass these, never hand-built dicts.

Input records before ``prepare`` are :class:`unimm.data.records.Record` (image slices hold a
path there); a :class:`Slice` holds the image itself.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from unimm.data.records import ROLES, PairSides, SliceKind

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass(frozen=True)
class Slice:
    """One text or image slice of a decoded sample.

    Attributes:
        kind: ``"text"`` or ``"image"``.
        text: the text of a text slice.
        image: the image of an image slice: a PIL image, or its JPEG bytes while undecoded
            (the training stream decodes per batch, see :func:`unimm.data.shards.decode_images_in`).
        role: ``"user"``, or ``"assistant"`` for an earlier assistant turn (context, not a target).
        width, height: the stored image's size, when read from a shard.
    """

    kind: SliceKind
    text: str | None = None
    image: Any = None
    role: str = "user"
    width: int | None = None
    height: int | None = None

    def __post_init__(self) -> None:
        if self.kind == "text" and not isinstance(self.text, str):
            raise TypeError(f"a text slice needs a str text, got {type(self.text).__name__}")
        if self.kind == "image" and self.image is None:
            raise TypeError("an image slice needs an image")
        if self.kind not in ("text", "image"):
            raise TypeError(f"slice kind must be 'text' or 'image', got {self.kind!r}")
        if self.role not in ROLES:
            raise TypeError(f"slice role must be one of {ROLES}, got {self.role!r}")

    @classmethod
    def of_text(cls, text: str, role: str = "user") -> Slice:
        return cls("text", text=text, role=role)

    @classmethod
    def of_image(cls, image: Any, role: str = "user") -> Slice:
        return cls("image", image=image, role=role)

    def as_role(self, role: str) -> Slice:
        """This slice spoken by ``role``."""
        return self if self.role == role else dataclasses.replace(self, role=role)


@dataclasses.dataclass
class Sample:
    """One decoded sample.

    Attributes:
        key: unique within its source (the shard member key); seeds the sample's cut points.
        slices: the interleaved slices, in order.
        id: the record's id (``None`` for ad-hoc prompts).
        response: the answer to train on or to score, if any.
        meta: the record's ``meta`` object, if any.
        source: where the record came from (input file and line), if known.
        url: the shard it was read from, if any.
        teacher: the teacher features ``{"u", "v", "modality"}`` (tensors), if prepared with teachers.
        epoch: the training epoch of its directory that drew it (0 outside training); with the key
            it seeds the sample's cut points, so each epoch sees other prefixes.
        task: the losses it trains: ``both``, ``generative`` (next-token loss only) or
            ``discriminative`` (alignment loss only).
        pair: for a pair record, how ``slices`` divide into query, positive and negatives
            (:func:`unimm.data.pairs.split_sides` cuts it up).
        instruction: the instruction text it is encoded under (its system text), if any.
        instruction_name: the record's instruction task (a key of ``model.instructions``), if any.
    """

    key: str
    slices: list[Slice]
    id: str | None = None
    response: str | None = None
    meta: dict[str, Any] | None = None
    source: str | None = None
    url: str | None = None
    teacher: dict[str, torch.Tensor] | None = None
    epoch: int = 0
    task: str = "both"
    pair: PairSides | None = None
    instruction: str | None = None
    instruction_name: str | None = None

    @classmethod
    def of_slices(cls, slices: list[Slice], key: str = "prompt", **fields: Any) -> Sample:
        """An ad-hoc sample (a query, a prompt) of ``slices``."""
        return cls(key=key, slices=list(slices), **fields)

    def texts(self) -> list[str]:
        """The texts of its text slices, in order."""
        return [s.text for s in self.slices if s.kind == "text"]

    def kinds(self) -> list[str]:
        return [s.kind for s in self.slices]

    def replace(self, **changes: Any) -> Sample:
        """A copy with ``changes`` (the slices list is shared unless replaced)."""
        return dataclasses.replace(self, **changes)
