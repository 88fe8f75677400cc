"""Small shared helpers: atomic writes, hashing, quiet library logging."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (FAISS, a library's
    ``save``): once the block ends without an error, the file is flushed to disk and renamed to
    ``path``; on an error it is removed and ``path`` is untouched.

    A reader sees the old file or the new one, never a half-written one, even after a crash.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def replace_folder(staging: Path, target: Path) -> None:
    """Put the finished folder ``staging`` at ``target``: an older ``target`` is renamed aside
    first and removed after, so ``target`` is always the old folder or the new one, whole."""
    import shutil

    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as sorted, indented UTF-8 JSON, atomically (same bytes for the same object)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_safetensors(path: str | Path, what: str = "weights") -> dict[str, Any]:
    """The tensors of a safetensors file, or a :class:`~unimm.errors.UnimmError` naming the file
    when it is missing, truncated or edited (the library's own error says neither)."""
    from safetensors.torch import load_file

    from unimm.errors import UnimmError

    try:
        return load_file(path)
    except FileNotFoundError:
        raise UnimmError(f"{path}: missing ({what}); the folder is incomplete") from None
    except Exception as exc:  # SafetensorError, OSError, ValueError for a damaged file
        raise UnimmError(
            f"{path}: not a readable safetensors file ({exc}); the {what} file is damaged — "
            "restore it or make it again"
        ) from None


def quiet_transformers() -> None:
    """Silence transformers' per-load reports and progress bars; unimm shows its own progress."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def resolve_device(name: str, *, flag: str = "--device"):
    """A torch device from a user's option: ``auto`` (CUDA if present), ``cpu``, ``cuda``, ``cuda:1``…

    Raises:
        UnimmError: an unknown name, CUDA asked for where there is none, or a CUDA index too high.
    """
    import torch

    from unimm.errors import UnimmError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UnimmError(
            f"{flag} {name}: not a torch device name (e.g. auto, cpu, cuda, cuda:1, mps)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UnimmError(f"{flag} {name}: CUDA is not available on this machine; use {flag} cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UnimmError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def environment() -> dict[str, str]:
    """Versions of Python and of the libraries our figures depend on, and the instruction set
    torch's CPU kernels use (recorded beside results)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpu_code_paths": torch.backends.cpu.get_cpu_capability(),
    }
    for name in ("torch", "transformers", "tokenizers", "accelerate", "peft", "numpy"):
        try:
            env[name] = version(name)
        except PackageNotFoundError:
            env[name] = "not installed"
    return env


def text_table(rows: list[dict], keys: list[str], *, right: tuple[str, ...] = ()) -> str:
    """``rows`` as an aligned text table of the columns ``keys`` (a missing or ``None`` cell is
    blank; a column blank in every row is left out). Columns named in ``right`` are right-aligned
    (numbers), the others left-aligned."""
    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    cells = [["" if r.get(k) is None else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(row[i]) for row in cells)) for i, k in enumerate(keys)]

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if k in right else v.ljust(w) for k, v, w in zip(keys, values, widths, strict=True)
        ]
        return "  ".join(parts).rstrip()

    lines = [line(keys)] + [line(row) for row in cells]
    return "\n".join(lines)


def bench_timer(device: str):
    """``time(fn) -> seconds`` for the benches: the best of several runs after a warm-up on the
    CPU, Triton's ``do_bench`` median on CUDA."""
    import time

    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median") / 1e3

    def best(fn, repeats: int = 7) -> float:  # a shared VM is noisy: the best of 7
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    return best


def seed_of(salt: str) -> int:
    """A 64-bit seed from a text (the cut points' and the negatives' choices)."""
    return int.from_bytes(hashlib.sha256(salt.encode()).digest()[:8], "little")


LOG_INTERVAL_S = 30.0
"""How often a progress bar writes a line when stderr is not a terminal."""


class _LogLines:
    """A stream for tqdm that turns its in-place redraws (``\\r``) into whole log lines."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class _LoggedBar(tqdm):
    """A bar whose postfix changes wait for its next timed line (training sets one every step)."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def progress_bar(iterable=None, **options: Any):
    """A tqdm progress bar on a terminal; redirected to a file or a pipe (a log, CI, a
    scheduler's output), a line at the start, every :data:`LOG_INTERVAL_S` seconds and at the
    end, instead of redraws that flood the log."""
    import sys

    stream = options.pop("file", None) or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        options.setdefault("mininterval", LOG_INTERVAL_S)
        options.setdefault("maxinterval", LOG_INTERVAL_S)
        options.setdefault(
            "bar_format", "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
        )
        return _LoggedBar(iterable, file=_LogLines(stream), **options)
    return tqdm(iterable, file=stream, **options)
