"""Checks that CI runs beside the README's two commands (``.ci/run``).

    python scripts/ci_checks.py environment requirements.lock
    python scripts/ci_checks.py quickstart-summary unimm-quickstart/summary.txt README.md

``environment``: the active environment is the locked one — every package that ``unimm[dev]``
needs, followed through the installed metadata, is pinned by the lock and installed at that
version (a local build label such as ``+cpu`` aside), and the lock pins nothing else. Tests are
written to hold on any supported environment; this check makes sure CI's is the one the
published figures come from.

``quickstart-summary``: the summary that ``unimm quickstart`` wrote is the one the README shows:
line for line except the time, and each figure either equal to the README's or inside the band
the README's table of CI bands gives it. CPU kinds round differently (another instruction set,
another kernel), and after 1500 steps the figures differ; the bands are the spread measured over
CPU settings forced on one machine (``scripts/quickstart_seeds.py --cpu grid``), wide enough for
any CPU kind and narrow enough that a change that breaks learning falls outside.

Both print what differs and exit 1; 0 when all agree.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

# The figures of each summary line, in the order the line prints them; the line's other numbers
# (a chance level, the averaging window, the checkpoint's step) must equal the README's.
SUMMARY_FIGURES = {
    "loss_gen": ("loss_gen first", "loss_gen last"),
    "loss_disc": ("loss_disc first", "loss_disc last"),
    "caption accuracy": ("caption exact", "caption words"),
    "QA exact match": ("QA exact match",),
    "two-choice accuracy": ("two-choice accuracy",),
    "text→image R@1": ("text→image R@1",),
    "target–learned similarity": ("target–learned correlation",),
}
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def read_lock(path: Path) -> dict[str, str]:
    """Package name (canonical) -> pinned version, from a pip-compile'd lock."""
    pins = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line)
        if match:
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def needed(root: str, extras: set[str]) -> set[str]:
    """Every distribution that ``root[extras]`` needs, by the installed metadata (root left out)."""
    seen: set[str] = set()
    todo = [(root, frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        requires = distribution(name).requires or []
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not any(
                req.marker.evaluate({"extra": extra}) for extra in (wanted or {""})
            ):
                continue
            key = canonicalize_name(req.name)
            if key not in seen:
                seen.add(key)
                todo.append((req.name, frozenset(req.extras)))
    return seen


def check_environment(lock: Path) -> list[str]:
    pins = read_lock(lock)
    problems = []
    wanted = needed("unimm", {"dev"})
    for name in sorted(wanted - set(pins)):
        problems.append(f"{name}: needed by unimm[dev] but not in {lock} (refresh it: bash scripts/lock)")
    for name in sorted(set(pins) - wanted):
        problems.append(f"{name}: pinned in {lock} but nothing in unimm[dev] needs it (bash scripts/lock)")
    for name in sorted(wanted & set(pins)):
        try:
            installed = distribution(name).version
        except PackageNotFoundError:
            problems.append(f"{name}: pinned {pins[name]} but not installed")
            continue
        if Version(installed).public != Version(pins[name]).public:
            problems.append(f"{name}: installed {installed}, the lock pins {pins[name]}")
    return problems


def readme_summary(readme: Path) -> list[str]:
    """The quickstart summary block of the README (the ```text block that starts with 'summary')."""
    blocks = re.findall(r"```text\n(summary\n.*?)```", readme.read_text(), flags=re.S)
    if len(blocks) != 1:
        raise SystemExit(f"{readme}: expected one ```text block starting with 'summary', found {len(blocks)}")
    return blocks[0].rstrip("\n").splitlines()


def readme_bands(readme: Path) -> dict[str, tuple[float, float]]:
    """The README's table of CI bands (headed ``| figure | CI accepts |``): figure -> (lowest,
    highest) accepted."""
    tables = re.findall(r"^\| figure \| CI accepts \|.*\n((?:\|.*\n?)+)", readme.read_text(), flags=re.M)
    if len(tables) != 1:
        raise SystemExit(
            f"{readme}: expected one table headed '| figure | CI accepts |', found {len(tables)}"
        )
    bands = {}
    for name, low, high in re.findall(r"^\| ([^|]+?) \| (-?[\d.]+) – (-?[\d.]+) \|", tables[0], flags=re.M):
        bands[name] = (float(low), float(high))
    missing = [n for names in SUMMARY_FIGURES.values() for n in names if n not in bands]
    if missing:
        raise SystemExit(f"{readme}: the table of CI bands has no row for {', '.join(missing)}")
    return bands


def split_figures(line: str) -> tuple[str, dict[str, float]]:
    """A summary line as (its text with the figures blanked out, the figures by name)."""
    label = line.split(":", 1)[0].strip()
    names = SUMMARY_FIGURES.get(label, ())
    found = iter(NUMBER.finditer(line.split(":", 1)[-1]))
    offset = len(line) - len(line.split(":", 1)[-1])
    values, text, end = {}, [], 0
    for name in names:
        match = next(found, None)
        if match is None:
            return line, {}
        values[name] = float(match[0])
        text.append(line[end : offset + match.start()] + "#")
        end = offset + match.end()
    return "".join(text) + line[end:], values


def check_summary(summary: Path, readme: Path) -> tuple[list[str], list[str]]:
    """What breaks the summary (problems), and the figures that differ inside their bands (notes)."""

    def lines(text: list[str]) -> list[str]:
        return [line.rstrip() for line in text if not line.strip().startswith("time ")]

    ours, theirs = lines(summary.read_text().splitlines()), lines(readme_summary(readme))
    problems, notes = [], []
    if len(ours) != len(theirs):
        problems.append(f"the README's summary has {len(theirs)} lines, the quickstart's {len(ours)}")
    if ours == theirs:
        return problems, notes
    bands = readme_bands(readme)
    for want, got in zip(theirs, ours, strict=False):
        (want_text, want_figures), (got_text, got_figures) = split_figures(want), split_figures(got)
        if want_text != got_text or want_figures.keys() != got_figures.keys():
            problems.append(f"README: {want!r}\n    quickstart: {got!r}")
            continue
        for name, value in got_figures.items():
            low, high = bands[name]
            if not low <= value <= high:
                problems.append(
                    f"{name}: {value} outside the README's band {low} – {high} (README: {want_figures[name]})"
                )
            elif value != want_figures[name]:
                notes.append(f"{name}: {value} (README: {want_figures[name]}; band {low} – {high})")
    return problems, notes


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "environment":
        problems = check_environment(Path(argv[1]))
        what = "the environment matches the lock"
    elif len(argv) == 3 and argv[0] == "quickstart-summary":
        problems, notes = check_summary(Path(argv[1]), Path(argv[2]))
        what = "the quickstart summary is the README's (exact, or each figure within its CI band)"
        if notes and not problems:
            what = f"the quickstart summary is the README's, {len(notes)} figure(s) within their CI bands"
            print("\n".join(f"  - {note}" for note in notes))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)
    print(f"{'FAILED' if problems else 'ok'}: {what}", file=sys.stderr if problems else sys.stdout)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
