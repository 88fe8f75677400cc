"""Outputs never clobber inputs: what a folder holds, and the check every command makes on --out.

Each unimm artefact folder says what it is: prepared shards and indexes in their
``manifest.json`` (``kind``), a checkpoint by its ``unimm.json``, a training run by its
``metrics.jsonl`` or ``step-*`` folders. A command writes only into a folder that holds nothing
of unimm's or its own kind (``--overwrite`` and ``--resume`` then act on its own files only), and
never into one of its own inputs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from unimm.errors import UnimmError

KINDS = {
    "unimm-shards": "prepared shards (`unimm prepare`)",
    "unimm-index": "an index (`unimm embed`)",
    "unimm-run": "a training run (`unimm train`)",
    "unimm-checkpoint": "a checkpoint (`unimm train`)",
    "unimm-export": "an exported model (`unimm export`)",
}


def folder_kind(folder: Path) -> str | None:
    """The kind of unimm artefact ``folder`` holds (a key of :data:`KINDS`), or None."""
    if not folder.is_dir():
        return None
    if (folder / "unimm-export.json").is_file():  # before unimm.json: an hf-merged export has both
        return "unimm-export"
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            kind = json.loads(manifest.read_text(encoding="utf-8")).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind in KINDS:
            return kind
    if (folder / "unimm.json").is_file():
        return "unimm-checkpoint"
    if (folder / "metrics.jsonl").is_file() or any(p.is_dir() for p in folder.glob("step-*")):
        return "unimm-run"
    return None


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def claim_output(
    out: Path, kind: str | None, inputs: Iterable[str | Path] = (), *, flag: str = "--out"
) -> None:
    """Refuse ``out`` (a folder for ``kind``, or a file when ``kind`` is None) when it would clobber
    something: another command's artefacts, or one of ``inputs`` (the same path, or an input
    inside it; a file inside an input folder of a unimm kind).

    Raises:
        UnimmError: naming what ``out`` holds and what to do.
    """
    target = out.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if _within(source, target) or (kind is None and _within(target, source) and folder_kind(source)):
            raise UnimmError(
                f"{flag} {out}: it is (or holds) this command's input {given}; choose another {flag}"
            )
    if kind is None:  # a file: not inside a folder another command owns
        owner = folder_kind(target.parent)
        if owner in ("unimm-shards", "unimm-index", "unimm-checkpoint"):
            raise UnimmError(
                f"{flag} {out}: {target.parent} holds {KINDS[owner]}; write the file somewhere else"
            )
        return
    found = folder_kind(target)
    if found is not None and found != kind:
        raise UnimmError(
            f"{flag} {out} holds {KINDS[found]}; choose another {flag} (--overwrite replaces only "
            f"{KINDS[kind].split(' (')[0]}, never another command's output)"
        )
