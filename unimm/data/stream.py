"""Training data: shard checks, a deterministic mixed stream with a resumable position.

Used by ``unimm train``: :class:`DataStream` mixes several prepared shard directories by weight
and can replay to a saved position, so a resumed run sees exactly the samples an uninterrupted
one would.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from unimm.errors import UnimmError


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
            "generative-only with --set train.alpha=0"
        )
    return manifests


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

    def _stream(self, k: int) -> Iterator[dict]:
        from unimm.data.shards import read_samples

        while True:
            pipeline = read_samples(
                self.data.train[k],
                shuffle_shards=True,
                shuffle_buffer=self.data.shuffle_buffer,
                seed=self.seed * 1000 + self.epochs[k],
                split_by_node=True,
                split_by_worker=False,
            )
            got = False
            for sample in pipeline:
                got = True
                yield sample
            if not got:
                raise UnimmError(f"{self.data.train[k]}: no readable sample (all skipped as corrupt?)")
            self.epochs[k] += 1

    def next(self) -> dict:
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
            texts.extend(s["text"] for s in sample["slices"] if s["kind"] == "text")
            if sample.get("response"):
                texts.append(sample["response"])
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
