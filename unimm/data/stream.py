"""Training data: shard checks, a deterministic mixed stream with a resumable position, batches.

Used by ``unimm train``: :class:`DataStream` mixes several prepared shard directories by weight
and can replay to a saved position, so a resumed run sees exactly the samples an uninterrupted
one would. The stream keeps images as JPEG bytes (replaying is cheap); :class:`BatchMaker`
decodes and collates them, in the training loop (:class:`InlineBatches`), on a thread
(:class:`Prefetcher`) or in worker processes (:class:`WorkerBatches`) — the same batches in the
same order either way (:func:`open_batches` picks one).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from unimm.data.samples import Sample
from unimm.errors import UnimmError

log = logging.getLogger(__name__)


def check_shards(data, need_teachers: bool) -> list[dict]:
    """Read each directory's manifest; teacher features must be there when ``need_teachers``."""
    from unimm.data.shards import read_manifest

    manifests = []
    without = []
    for folder in data.train:
        try:
            manifest = read_manifest(folder)
        except UnimmError as exc:
            raise UnimmError(f"data.train: {exc}") from None
        if manifest["counts"]["samples"] == 0:
            raise UnimmError(f"data.train: {folder} holds no samples")
        if need_teachers and not manifest.get("teachers"):
            without.append(folder)
        manifests.append(manifest)
    if without:
        raise UnimmError(
            f"train.alpha > 0 needs teacher features, but {', '.join(without)} has none. Either prepare "
            "them again with --teacher-image-expert/--teacher-text-expert/--teacher-clip, or train "
            "without the structural loss with --set train.alpha=0 (the next-token loss, and the pair "
            "loss of pair records)"
        )
    return manifests


def check_instructions(manifests: list[dict], folders: list, instructions: dict) -> None:
    """Refuse shards whose records name an instruction task that ``model.instructions`` lacks,
    before training starts (``prepare`` lists the names in the manifest)."""
    from unimm.data.instructions import unknown_task_message

    for folder, manifest in zip(folders, manifests, strict=True):
        for name in manifest.get("instructions", []):
            if name not in instructions:
                raise UnimmError(
                    unknown_task_message(name, instructions, f"data.train: {folder}")
                    + "; add it to the recipe's model.instructions, or prepare the records without it"
                )


def check_data_fits(manifests: list[dict], folders: list, processes: int, batch_size: int) -> None:
    """Refuse data too small for ``processes`` × ``batch_size`` before training starts.

    Each process reads its own shards of every directory (whole shards, split by rank), so a
    directory needs at least one shard per process; and one step takes ``batch_size`` samples on
    each process, so fewer samples than ``processes × batch_size`` would repeat samples inside a
    step (the same document as its own negative).
    """
    problems = []
    for folder, manifest in zip(folders, manifests, strict=True):
        shards = manifest["counts"]["shards"]
        if shards < processes:
            per_shard = max(1, manifest["counts"]["samples"] // processes)
            problems.append(
                f"{folder} has {shards} shard(s) for {processes} processes, and each process reads "
                f"whole shards of its own: prepare it again with at least {processes} shards (unimm "
                f"prepare ... --samples-per-shard {per_shard}) or launch at most {shards} process(es)"
            )
    samples = sum(m["counts"]["samples"] for m in manifests)
    if samples < processes * batch_size:
        problems.append(
            f"{samples} training samples for {processes} process(es) × train.batch_size {batch_size} = "
            f"{processes * batch_size} per step: add data, lower train.batch_size to "
            f"{max(1, samples // processes)} or less, or launch fewer processes"
        )
    if problems:
        raise UnimmError("data.train is too small for this launch:\n  - " + "\n  - ".join(problems))


class DataStream:
    """Deterministic samples mixed from several shard directories, with a resumable position.

    Each directory is read in epochs (seeded shard and sample shuffles that change per epoch);
    which directory the next sample comes from is drawn from a seeded generator by weight. The
    position (samples taken per directory, their epochs, the draws) is saved in checkpoints and
    restored by replaying, so a resumed run sees exactly the samples an uninterrupted one would.
    """

    def __init__(self, data, seed: int) -> None:
        self.data = data
        self.seed = seed
        self.weights = data.weights or [1.0] * len(data.train)
        self.draws = 0
        self.taken = [0] * len(data.train)
        self.epochs = [0] * len(data.train)
        self._iters: list[Iterator | None] = [None] * len(data.train)
        self._rng = random.Random(seed)
        self.seen: collections.Counter[str] = collections.Counter()
        """Samples drawn so far by the task they train (after ``data.task_fraction``)."""

    def _stream(self, k: int) -> Iterator[Sample]:
        from unimm.data.shards import read_samples

        while True:
            pipeline = read_samples(
                self.data.train[k],
                shuffle_shards=True,
                shuffle_buffer=self.data.shuffle_buffer,
                seed=self.seed * 1000 + self.epochs[k],
                split_by_node=True,
                split_by_worker=False,
                decode_images=False,  # decoded per batch by BatchMaker, where the batch is made
                verify=self.data.verify,
            )
            got = read = False
            for sample in pipeline:
                read = True
                kept = self._reduced(sample)
                if kept is None:
                    continue
                got = True
                self.seen[kept.task] += 1
                yield kept.replace(epoch=self.epochs[k])
            if not got:  # check_data_fits rules out a process without shards
                why = "all left out by data.task_fraction" if read else "all skipped as corrupt?"
                raise UnimmError(f"{self.data.train[k]}: no readable sample ({why})")
            self.epochs[k] += 1

    def _reduced(self, sample: Sample) -> Sample | None:
        """``sample`` as ``data.task_fraction`` keeps it: unchanged, without the task it loses
        (``both`` → the other task), or ``None`` (a single-task sample whose task is left out)."""
        for task, fraction in self.data.task_fraction.items():
            if sample.task not in (task, "both") or fraction >= 1:
                continue
            digest = hashlib.sha256(f"{self.seed}/{task}/{sample.key}".encode()).digest()
            if int.from_bytes(digest[:8], "little") / 2**64 < fraction:
                continue
            if sample.task == task:
                return None
            other = "discriminative" if task == "generative" else "generative"
            sample = sample.replace(task=other)
        return sample

    def next(self) -> Sample:
        k = (
            self._rng.choices(range(len(self.weights)), weights=self.weights)[0]
            if len(self.weights) > 1
            else 0
        )
        self.draws += 1
        if self._iters[k] is None:
            self._iters[k] = self._stream(k)
        self.taken[k] += 1
        return next(self._iters[k])

    def position(self) -> dict:
        return {"draws": self.draws, "taken": list(self.taken)}

    def restore(self, position: dict) -> None:
        """Replay to a saved position (re-reading the samples it skips)."""
        for _ in range(int(position["draws"])):
            self.next()
        if self.taken != list(position["taken"]):
            raise UnimmError("resume: the data position does not replay (were the shards changed?)")


def training_texts(data, limit: int = 20000) -> list[str]:
    """Texts of the first samples, to train the tiny model's tokenizer on."""
    from unimm.data.shards import read_samples

    texts = []
    for folder in data.train:
        for sample in read_samples(folder, split_by_node=False, split_by_worker=False, decode_images=False):
            texts.extend(sample.texts())
            if sample.response:
                texts.append(sample.response)
            if len(texts) >= limit:
                return texts
    return texts


class Prefetcher:
    """Prepares the next batches on a background thread while the model trains.

    ``make(samples)`` (collation: tokenising, image preprocessing) runs on the thread too. Each
    item carries the stream position *after* its samples, so a checkpoint saves what was
    consumed, not what was read ahead, and resuming stays exact.

    Args:
        stream: the :class:`DataStream`.
        count: samples per item.
        make: turns a list of samples into what the training loop consumes.
        depth: items prepared ahead.
    """

    def __init__(self, stream: DataStream, count: int, make, depth: int = 2) -> None:
        import queue
        import threading

        self.stream = stream
        self.count = count
        self.make = make
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.position = stream.position()
        self._thread = threading.Thread(target=self._work, name="unimm-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                samples = [self.stream.next() for _ in range(self.count)]
                item = (self.make(samples), self.stream.position(), None)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except Exception:  # queue.Full: wait for the consumer or a stop
                        continue
        except BaseException as exc:  # handed to the consumer, raised there
            self._queue.put((None, None, exc))

    def next(self):
        """The next prepared item (raises what the thread raised)."""
        item, position, error = self._queue.get()
        if error is not None:
            raise error
        self.position = position
        return item

    def close(self) -> None:
        self._stop.set()
        while not self._queue.empty():
            self._queue.get_nowait()
        self._thread.join(timeout=5)


class BatchMaker:
    """Turns drawn samples into what the training loop consumes: ``(payload, samples left out)``.

    Decodes the images (a sample with an undecodable image is left out with a warning), then
    collates the batch whole, or in chunks of ``chunk`` samples (gradient caching). Picklable when
    the collator is, so worker processes can run it.
    """

    def __init__(self, collator: Callable[[list[Sample]], dict], chunk: int = 0) -> None:
        self.collator = collator
        self.chunk = chunk

    def __call__(self, samples: list[Sample]) -> tuple[Any, int]:
        from unimm.data.shards import decode_images_in

        kept, problems = decode_images_in(samples)
        for problem in problems:
            log.warning("leaving out a sample with a corrupt image: %s", problem)
        if not kept:
            raise UnimmError(
                f"every sample of a batch has an undecodable image ({problems[0]}); the shards are "
                "damaged: prepare them again with unimm prepare"
            )
        if self.chunk:
            payload: Any = [self.collator(kept[i : i + self.chunk]) for i in range(0, len(kept), self.chunk)]
        else:
            payload = self.collator(kept)
        return payload, len(samples) - len(kept)


class InlineBatches:
    """Batches made in the training loop itself, when it asks for them."""

    def __init__(self, stream: DataStream, count: int, make: Callable) -> None:
        self.stream, self.count, self.make = stream, count, make

    @property
    def position(self) -> dict:
        return self.stream.position()

    def next(self):
        return self.make([self.stream.next() for _ in range(self.count)])

    def close(self) -> None:
        pass


class _WorkerShare(IterableDataset):
    """The batches of one worker: every worker reads the whole stream (reading is cheap) and makes
    batches ``worker, worker + workers, …`` of it; the DataLoader returns them round-robin, which
    is the order a single process would make them in."""

    def __init__(self, data, seed: int, position: dict | None, count: int, make: Callable) -> None:
        super().__init__()
        self.data, self.seed, self.position, self.count, self.make = data, seed, position, count, make

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            stream = DataStream(self.data, self.seed)
            if self.position is not None:
                stream.restore(self.position)
            index = 0
            while True:
                samples = [stream.next() for _ in range(self.count)]
                if index % workers == worker:
                    yield self.make(samples), stream.position(), None
                index += 1
        except UnimmError as exc:  # raised by the training loop as it is, without a worker traceback
            yield None, None, str(exc)


def _as_is(item):
    return item


class WorkerBatches:
    """Batches made ahead by ``workers`` processes (a torch DataLoader), in single-process order.

    Each item carries the stream position after its samples, so a checkpoint saves what was
    consumed, not what was made ahead.
    """

    def __init__(
        self, data, seed: int, position: dict | None, count: int, make: Callable, workers: int, depth: int
    ) -> None:
        # The workers are forked; the tokenizers library turns its thread pool off in a forked
        # process anyway, with a warning per worker. The workers are the parallelism here.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.position = position if position is not None else DataStream(data, seed).position()
        loader = DataLoader(
            _WorkerShare(data, seed, position, count, make),
            batch_size=None,
            num_workers=workers,
            prefetch_factor=max(1, depth),
            collate_fn=_as_is,
        )
        self._iterator = iter(loader)

    def next(self):
        item, position, error = next(self._iterator)
        if error is not None:
            raise UnimmError(error)
        self.position = position
        return item

    def close(self) -> None:
        shutdown = getattr(self._iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._iterator = None


def open_batches(data, seed: int, count: int, make: Callable, position: dict | None = None):
    """The batch source ``unimm train`` reads: in worker processes (``data.workers``), on a thread
    (``data.prefetch``) or inline; all give the same batches in the same order.

    Args:
        data: the ``data`` options (sources, weights, shuffle buffer, workers, prefetch).
        seed: seeds the stream (``train.seed`` plus the rank).
        count: samples per batch.
        make: a :class:`BatchMaker`.
        position: a saved stream position to continue from (resume).
    """
    if data.workers > 0:
        return WorkerBatches(data, seed, position, count, make, data.workers, data.prefetch)
    stream = DataStream(data, seed)
    if position is not None:
        stream.restore(position)
    if data.prefetch > 0:
        return Prefetcher(stream, count, make, data.prefetch)
    return InlineBatches(stream, count, make)
