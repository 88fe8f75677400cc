"""A vector database behind unimm's indexes: Qdrant (``pip install "unimm[qdrant]"``).

    unimm index push --index index --db http://qdrant:6333 --collection docs   # a Qdrant server
    unimm index push --index index --db ./vectors --collection docs            # embedded (a folder)
    unimm retrieve --model RUN/step-000200 --db ./vectors --collection docs --query "red" \
        --filter lang=en

Why Qdrant: one client library speaks to a Qdrant server (REST or gRPC, clustered) and, with a
folder instead of a URL, runs the same API in-process (its local mode), so tests and a laptop use
the code path a cluster uses; points are upserted by id (a re-push is a no-op, a resumed push
duplicates nothing); payloads are JSON with filters on any field; Apache-2.0. (Milvus Lite is the
other embedded option; its 3.x releases are likewise a local re-implementation of the server's
API.)

A document is one point: its id is a UUID derived from the unimm document id (so the same
document always lands on the same point), its vector the index's, its payload the document id,
the index row (what chat and serve open the document from), the search view (``text``,
``images``, ``metadata``, ``source``) and the model hash. Distance is the dot product of unit
vectors, so database search equals the index's exact search. Each collection has a card, a
one-point side collection ``NAME__unimm`` (model hash, dimension, instruction task, the metadata
fields seen, the index's data folders): a push of another model or dimension, and a filter on a
field no document has, are refused from it.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from unimm.errors import UnimmError

CARD_SUFFIX = "__unimm"
_CARD_ID = str(uuid.UUID(int=0))
_NAMESPACE = uuid.UUID("6f1c9a3e-2b7d-4c1e-9a55-0d3b1f6a7c21")


def point_id(document_id: str) -> str:
    """The point of a document: the same id always gives the same point."""
    return str(uuid.uuid5(_NAMESPACE, document_id))


def connect(db: str):
    """A Qdrant client: ``http(s)://…`` a server, anything else a local folder (embedded mode).

    Raises:
        UnimmError: the package is missing, or the server cannot be reached.
    """
    try:
        from qdrant_client import QdrantClient
    except ImportError:
        raise UnimmError('--db needs the Qdrant client: pip install "unimm[qdrant]"') from None
    if db.startswith(("http://", "https://")):
        client = QdrantClient(url=db, timeout=10)
        try:
            client.get_collections()
        except Exception as exc:  # the client's own connection and HTTP errors
            raise UnimmError(f"--db {db}: cannot reach the Qdrant server ({exc})") from None
        return client
    path = Path(db)
    if path.exists() and not path.is_dir():
        raise UnimmError(
            f"--db {db}: not a folder (give a Qdrant URL, or a folder for the embedded database)"
        )
    try:
        return QdrantClient(path=str(path))
    except RuntimeError as exc:  # the local mode's lock: one client at a time
        raise UnimmError(
            f"--db {db} is open elsewhere ({exc}); an embedded database has one user at a time: close "
            "the other, or run a Qdrant server and give its URL"
        ) from None


def read_card(client, collection: str) -> dict[str, Any] | None:
    """The collection's card, or ``None`` when there is no such collection."""
    if not client.collection_exists(collection + CARD_SUFFIX):
        return None
    points = client.retrieve(collection + CARD_SUFFIX, ids=[_CARD_ID], with_payload=True)
    return dict(points[0].payload) if points else None


def _write_card(client, collection: str, card: dict[str, Any]) -> None:
    from qdrant_client import models

    name = collection + CARD_SUFFIX
    if not client.collection_exists(name):
        client.create_collection(
            name, vectors_config=models.VectorParams(size=1, distance=models.Distance.DOT)
        )
    client.upsert(name, points=[models.PointStruct(id=_CARD_ID, vector=[0.0], payload=card)], wait=True)


def _check_fits(card: dict[str, Any], manifest: dict[str, Any], collection: str, index: str) -> None:
    if card["model_hash"] != manifest["model_hash"] or card["dim"] != manifest["dim"]:
        raise UnimmError(
            f"--collection {collection} holds {card['dim']}-d vectors of model {card['model']}; --index "
            f"{index} is {manifest['dim']}-d from {manifest['model']}: push it to another --collection"
        )
    if card.get("instruction", "") != manifest.get("instruction", ""):
        raise UnimmError(
            f"--collection {collection} holds documents embedded under instruction task "
            f"{card.get('instruction', '')!r}, --index {index} under {manifest.get('instruction', '')!r}"
        )


def _batches(index: str, batch_size: int) -> Iterator[tuple[torch.Tensor, list[dict]]]:
    from unimm.inference.store import IndexRows, part_embeddings, read_manifest

    folder = Path(index)
    manifest = read_manifest(folder)
    rows = IndexRows(folder, manifest, keep=1)  # a part at a time: a 10 M index's rows stay on disk
    for number, part in enumerate(manifest["parts"]):
        vectors, part_rows = part_embeddings(folder, part), rows.part(number)
        for start in range(0, len(vectors), batch_size):
            chunk = vectors[start : start + batch_size]
            yield chunk, part_rows[start : start + len(chunk)]


def push(
    index: str, db: str, collection: str, *, batch_size: int = 256, resume: bool = False, progress=None
) -> dict:
    """Upsert every document of ``index`` into ``collection`` (created on first push); return
    ``{"pushed", "skipped", "count"}``. ``resume`` skips batches whose points are all there
    already (a push killed half-way goes on where it stopped); without it every batch is
    upserted again, which changes nothing for documents already there.

    Raises:
        UnimmError: the collection holds another model's, dimension's or task's vectors (nothing
            is written), or the database cannot be reached.
    """
    from unimm.inference.store import read_manifest

    manifest = read_manifest(Path(index))
    client = connect(db)
    try:
        return _push(client, index, manifest, collection, batch_size, resume, progress)
    finally:  # an embedded database is locked while a client has it open
        client.close()


def _push(
    client, index: str, manifest: dict, collection: str, batch_size: int, resume: bool, progress
) -> dict:
    from qdrant_client import models

    from unimm.inference.documents import document_view

    card = read_card(client, collection)
    if card is not None:
        _check_fits(card, manifest, collection, index)
    else:
        if client.collection_exists(collection):
            raise UnimmError(f"--collection {collection} exists but was not made by unimm; give another name")
        client.create_collection(
            collection,
            vectors_config=models.VectorParams(size=int(manifest["dim"]), distance=models.Distance.DOT),
        )
        card = {
            "model": manifest["model"],
            "model_hash": manifest["model_hash"],
            "dim": int(manifest["dim"]),
            "instruction": manifest.get("instruction", ""),
            "fields": [],
            "data": manifest.get("data", []),
        }
        _write_card(client, collection, card)
    fields, pushed, skipped = set(card["fields"]), 0, 0
    for vectors, rows in _batches(index, batch_size):
        ids = [point_id(row["id"]) for row in rows]
        views = [document_view(row, manifest.get("data", [])) for row in rows]
        if resume and len(client.retrieve(collection, ids=ids, with_payload=False)) == len(ids):
            skipped += len(ids)
        else:
            points = [
                models.PointStruct(
                    id=pid,
                    vector=vector,
                    payload={"id": row["id"], "row": row, **view, "model_hash": manifest["model_hash"]},
                )
                for pid, vector, row, view in zip(ids, vectors.tolist(), rows, views, strict=True)
            ]
            client.upsert(collection, points=points, wait=True)
            pushed += len(points)
        seen = fields.union(*(view["metadata"] for view in views))
        if seen != fields:  # the card knows every field of what is in, even if the push stops here
            fields = seen
            _write_card(client, collection, {**card, "fields": sorted(fields)})
        if progress is not None:
            progress(len(ids))
    return {"pushed": pushed, "skipped": skipped, "count": client.count(collection).count}


def parse_filter(items: list[str]) -> dict[str, Any]:
    """``--filter KEY=VALUE`` (repeatable) as ``{key: value}`` (every condition must hold).

    Raises:
        UnimmError: an item without ``=``.
    """
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UnimmError(f"--filter {item}: give KEY=VALUE (a field of the documents' metadata)")
        out[key.strip()] = _filter_value(value)
    return out


def _filter_value(text: str):
    """A filter value as the metadata holds it: an integer or a boolean when it reads as one."""
    import json

    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (int, bool)) else text


def searcher_for(opts, session):
    """The searcher a command's options name (``index`` folder, or ``db`` + ``collection`` with
    ``filter``), for the queries ``session`` embeds; ``None`` when they name neither."""
    if opts.db:
        filters = parse_filter(opts.filter)
        return DatabaseSearcher(
            opts.db, opts.collection, model=opts.model, instruction=session.task, filters=filters
        )
    if opts.index:
        from unimm.inference.ann import Searcher

        return Searcher.for_session(opts.index, session, opts.model, opts.backend)
    return None


class _FoundRows:
    """The index rows of the documents found lately, by number (a long-running server searches
    forever: the oldest are let go past :data:`KEPT`)."""

    KEPT = 100_000

    def __init__(self) -> None:
        self.rows: dict[int, dict] = {}
        self.next = 0

    def add(self, row: dict) -> int:
        number, self.next = self.next, self.next + 1
        self.rows[number] = row
        self.rows.pop(number - self.KEPT, None)
        return number

    def __getitem__(self, number: int) -> dict:
        return self.rows[number]

    def __len__(self) -> int:
        return len(self.rows)


class DatabaseSearcher:
    """Search a collection as :class:`unimm.inference.ann.Searcher` searches an index folder:
    ``search`` gives ``(row, score)`` pairs, ``rows[row]`` the index row of each found document.
    Searches of one embedded database take turns (its local mode is not made for threads)."""

    backend = "qdrant"

    def __init__(
        self, db: str, collection: str, *, model: str, instruction: str | None, filters: dict[str, str]
    ):
        from unimm.inference.store import model_hash

        self.client, self.collection = connect(db), collection
        try:
            card = self._check(db, collection, model, instruction, filters, model_hash)
        except BaseException:
            self.client.close()
            raise
        self.filters, self.dim = filters, int(card["dim"])
        self.manifest = {"data": card.get("data", []), "model": card["model"]}
        self.rows = _FoundRows()
        self.lock = threading.Lock()

    def _check(self, db, collection, model, instruction, filters, model_hash) -> dict[str, Any]:
        card = read_card(self.client, collection)
        if card is None:
            raise UnimmError(
                f"--collection {collection}: no such collection in --db {db} (push one: unimm index push)"
            )
        if card["model_hash"] != model_hash(model):
            raise UnimmError(
                f"--collection {collection} holds vectors of another model ({card['model']}); query it with "
                "that model, or push an index of this one"
            )
        if instruction is not None and card.get("instruction", "") != instruction:
            raise UnimmError(
                f"--collection {collection}: its documents were embedded under instruction task "
                f"{card.get('instruction', '')!r}, the queries' is {instruction!r}"
            )
        self.fields = list(card["fields"])
        self.check_filters(filters)
        return card

    def check_filters(self, filters: dict[str, Any]) -> None:
        """Refuse a filter on a field no document of the collection has.

        Raises:
            UnimmError: naming the fields there are.
        """
        unknown = sorted(set(filters) - set(self.fields))
        if unknown:
            known = ", ".join(self.fields) or "none"
            raise UnimmError(
                f"--filter {', '.join(unknown)}: no document has that metadata field (fields: {known})"
            )

    @property
    def count(self) -> int:
        """Documents in the collection."""
        with self.lock:
            return int(self.client.count(self.collection).count)

    def close(self) -> None:
        """Let go of the database (an embedded one is locked while it is open)."""
        self.client.close()

    def _filter(self, extra: dict[str, Any] | None):
        from qdrant_client import models

        filters = {**self.filters, **(extra or {})}
        if not filters:
            return None
        conditions = [
            models.FieldCondition(key=f"metadata.{key}", match=models.MatchValue(value=value))
            for key, value in filters.items()
        ]
        return models.Filter(must=conditions)

    def search(
        self, queries: torch.Tensor, k: int, *, block: int = 65536, filters: dict[str, Any] | None = None
    ) -> list[list[tuple[int, float]]]:
        """For each query, up to ``k`` ``(row, score)`` pairs, best first; ``filters`` (checked
        with :meth:`check_filters`) add to the searcher's own."""
        from unimm.model.core import truncate

        out, condition = [], self._filter(filters)
        for query in truncate(queries, self.dim).tolist():
            with self.lock:
                found = self.client.query_points(
                    self.collection, query=query, limit=k, with_payload=True, query_filter=condition
                ).points
                out.append([(self.rows.add(point.payload["row"]), float(point.score)) for point in found])
        return out
