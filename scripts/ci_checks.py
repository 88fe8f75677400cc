"""Checks that CI runs beside the README's two commands (``.ci/run``).

    python scripts/ci_checks.py environment requirements.lock
    python scripts/ci_checks.py quickstart-summary unimm-quickstart/summary.txt README.md

``environment``: the active environment is the locked one — every package that ``unimm[dev]``
needs, followed through the installed metadata, is pinned by the lock and installed at that
version (a local build label such as ``+cpu`` aside), and the lock pins nothing else. Tests are
written to hold on any supported environment; this check makes sure CI's is the one the
published figures come from.

``quickstart-summary``: the summary that ``unimm quickstart`` wrote equals the one the README
shows, line for line, except the time.

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


def check_summary(summary: Path, readme: Path) -> list[str]:
    def figures(lines: list[str]) -> list[str]:
        return [line.rstrip() for line in lines if not line.strip().startswith("time ")]

    ours, theirs = figures(summary.read_text().splitlines()), figures(readme_summary(readme))
    problems = [
        f"README: {want!r}\n    quickstart: {got!r}"
        for want, got in zip(theirs, ours, strict=False)
        if want != got
    ]
    if len(ours) != len(theirs):
        problems.append(f"the README's summary has {len(theirs)} lines, the quickstart's {len(ours)}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "environment":
        problems = check_environment(Path(argv[1]))
        what = "the environment matches the lock"
    elif len(argv) == 3 and argv[0] == "quickstart-summary":
        problems = check_summary(Path(argv[1]), Path(argv[2]))
        what = "the quickstart summary equals the README's"
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)
    print(f"{'FAILED' if problems else 'ok'}: {what}", file=sys.stderr if problems else sys.stdout)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
