"""Shared pieces of the ``unimm`` command line: option types and the user-error wrapper."""

from __future__ import annotations

import errno
import functools
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from unimm.errors import UnimmError

RecipeOpt = Annotated[
    Path | None,
    typer.Option(
        "--recipe",
        help="YAML recipe file (sections: prepare, teachers, ...) or a shipped recipe's name "
        "(`unimm recipes` lists them).",
        dir_okay=False,
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Dotted override, repeatable: --set prepare.workers=4", metavar="KEY=VALUE"),
]


def default(key: str) -> str:
    """``[default: X]`` for a help text, read from the config section that owns ``key`` (e.g.
    ``retrieve.top_k``), so that a default lives in one place; the option itself defaults to
    ``None`` ("not given"), leaving the recipe's or the section's value in force."""
    from unimm.config import SECTIONS

    section, name = key.split(".")
    return f"\\[default: {getattr(SECTIONS[section](), name)}]"


ModelDtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--model-dtype",
        # every inference section has this field with the same default (tests/test_cli.py)
        help="auto (as saved) | float32 | bfloat16 | float16 \\[default: auto]",
    ),
]


InstructionOpt = Annotated[
    str | None,
    typer.Option(
        "--instruction",
        help="Instruction task of the checkpoint's model.instructions to encode queries and documents "
        'under ("" = none) \\[default: the checkpoint\'s default_instruction]',
    ),
]


QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bars or status lines; results and errors only.")
]

DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="Search a vector database (a Qdrant URL, or an embedded one's folder) instead of --index.",
    ),
]
CollectionOpt = Annotated[str | None, typer.Option("--collection", help="The --db collection.")]
FilterOpt = Annotated[
    list[str] | None,
    typer.Option("--filter", help="KEY=VALUE on the documents' metadata (--db); repeatable."),
]

ColumnsOpt = Annotated[
    str | None,
    typer.Option(
        "--columns",
        help="Which columns of an image–text table (CSV/TSV, Parquet, datasets folder, imagefolder) "
        "are the image, the text and the id: image=COL,text=COL,id=COL.",
    ),
]


def as_options(section: str, values: dict[str, Any], renames: dict[str, str] | None = None) -> dict[str, Any]:
    """CLI values as dotted config options: parameter ``name`` → ``section.name`` unless
    ``renames`` says otherwise. Paths become strings; ``None``, an empty list and a flag left off
    (``False``) are "not given", so they leave the recipe's value in force."""
    renames = renames or {}
    options: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, list):
            value = [str(v) if isinstance(v, Path) else v for v in value] or None
        options[renames.get(name, f"{section}.{name}")] = None if value is False else value
    return options


DEBUG_ENV = "UNIMM_DEBUG"
"""Set to 1 to see the traceback behind any error message (for a bug report)."""

_OS_HINTS = {
    errno.EACCES: "check its permissions, or choose another path",
    errno.EPERM: "check its permissions, or choose another path",
    errno.EROFS: "the file system is read-only; choose a writable path",
    errno.ENOSPC: "the disk is full; free some space, then rerun (with --resume where it applies)",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "it is a folder; give a file",
}


def _os_message(exc: OSError) -> str:
    """An operating-system failure as one line: the file, what happened, what to do."""
    where = f"{exc.filename}: " if exc.filename else ""
    what = exc.strerror or str(exc)
    hint = _OS_HINTS.get(exc.errno or 0, f"(set {DEBUG_ENV}=1 to see where)")
    return f"{where}{what}; {hint}"


def user_errors(fn):
    """The error boundary: a :class:`UnimmError` or an operating-system failure (a missing file, a
    read-only or full disk, a permission) prints one message and exits 2; Ctrl-C exits 130 with a
    hint. Anything else is a bug and keeps its traceback; ``UNIMM_DEBUG=1`` shows every traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
        try:
            return fn(*args, **kwargs)
        except UnimmError as exc:
            if debug:
                raise
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        except OSError as exc:
            if debug:
                raise
            typer.secho(f"error: {_os_message(exc)}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.secho(
                "interrupted; finished work is kept (rerun with --resume)", fg=typer.colors.YELLOW, err=True
            )
            raise typer.Exit(130) from None

    return wrapper


def comma_list(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]
