"""Many bad records, told briefly: the same problem repeated is one line with its count, the
records it hit and how to fix it.

A problem's *kind* is its reason with the specifics taken out (quoted names, the path looked
for, numbers), so thirty "image 'x.jpg' not found" are one kind; the first record of a kind is
shown whole, as an example. Kinds that have a known fix get a hint (``--image-root`` when
images are not where the records say).
"""

from __future__ import annotations

import re

from unimm.errors import DataError

_SPECIFICS = (
    (re.compile(r"\(looked for [^)]*\)"), "(looked for …)"),
    (re.compile(r"resolves to \S+"), "resolves to …"),
    (re.compile(r"'[^']*'|\"[^\"]*\""), "'…'"),
    (re.compile(r"\d+"), "N"),
)
_HINTS = (
    (
        re.compile(r"not found|outside the image root"),
        "the images are not where the records say: if they live in another folder, pass "
        "--image-root DIR (image paths are relative to it; default: each input file's folder)",
    ),
    (re.compile(r"duplicate id"), "ids must be unique across all inputs: rename or drop the repeats"),
    (re.compile(r"decompression-bomb"), "if you trust these images, raise --max-image-pixels"),
    (
        re.compile(r"no image or text column|no image column|no text column|no such column"),
        "name the table's columns with --columns image=COLUMN,text=COLUMN[,id=COLUMN]",
    ),
)
LISTED_KINDS = 10
LISTED_PLACES = 8


def kind_of(reason: str) -> str:
    """A reason with its specifics replaced, so that repeats of one problem compare equal."""
    for pattern, replacement in _SPECIFICS:
        reason = pattern.sub(replacement, reason)
    return reason


def _place(problem: DataError) -> str:
    where = problem.source.rsplit("/", 1)[-1] if problem.source else "?"
    return f"{where}:{problem.line}" if problem.line is not None else where


def summarize(problems: list[DataError]) -> str:
    """The problems grouped by kind, most frequent first: the count, an example, where the
    others are, and the fix when one is known."""
    groups: dict[str, list[DataError]] = {}
    for problem in problems:
        groups.setdefault(kind_of(problem.reason), []).append(problem)
    lines, hints = [], []
    ordered = sorted(groups.items(), key=lambda item: -len(item[1]))
    for _, members in ordered[:LISTED_KINDS]:
        first = members[0]
        if len(members) == 1:
            lines.append(f"  - {first}")
        else:
            places = ", ".join(_place(p) for p in members[:LISTED_PLACES])
            more = f", … {len(members) - LISTED_PLACES} more" if len(members) > LISTED_PLACES else ""
            kind = kind_of(first.reason)
            lines.append(f"  - {len(members)} × {kind}\n      e.g. {first}\n      at {places}{more}")
        for pattern, hint in _HINTS:
            if pattern.search(first.reason) and hint not in hints:
                hints.append(hint)
    rest = len(ordered) - LISTED_KINDS
    if rest > 0:
        lines.append(
            f"  ... and {sum(len(m) for _, m in ordered[LISTED_KINDS:])} more of {rest} other kind(s)"
        )
    return "\n".join(lines + [f"Hint: {hint}." for hint in hints])
