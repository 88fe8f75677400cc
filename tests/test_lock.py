"""The lock, pyproject.toml, the README's commands and CI agree (static: holds on any environment).

Whether the installed environment *is* the locked one is CI's check
(``python scripts/ci_checks.py environment requirements.lock``), not a test: the tests must hold on
any supported environment.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from ci_checks import read_lock, readme_summary  # noqa: E402

# The lock is resolved on Linux with CPython 3.11 (bash scripts/lock on our machines).
LOCK_PLATFORM = {"platform_system": "Linux", "sys_platform": "linux", "python_version": "3.11"}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements() -> list[Requirement]:
    project = _pyproject()["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_every_requirement_is_pinned_within_its_bounds():
    pins = read_lock(ROOT / "requirements.lock")
    problems = []
    for req in _requirements():
        if req.marker is not None and not req.marker.evaluate(LOCK_PLATFORM):
            continue
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None:
            problems.append(f"{req.name}: not in requirements.lock")
        elif not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"{req.name}: the lock pins {pinned}, pyproject.toml wants {req.specifier}")
    assert not problems, (
        "pyproject.toml and requirements.lock disagree (run: bash scripts/lock):\n" + "\n".join(problems)
    )


@pytest.mark.parametrize("name", ["torch", "transformers", "tokenizers", "accelerate", "peft", "pytest"])
def test_the_libraries_our_results_depend_on_have_both_bounds(name):
    """A lower and an upper bound, so an untested major release cannot slip into a user's install."""
    (req,) = [r for r in _requirements() if canonicalize_name(r.name) == name]
    operators = {spec.operator for spec in req.specifier}
    assert operators & {">=", ">", "~=", "=="} and operators & {"<", "<=", "~=", "=="}, (name, req.specifier)


def test_the_lock_is_portable_and_names_its_refresh_command():
    text = (ROOT / "requirements.lock").read_text()
    assert "bash scripts/lock" in text
    assert "+cpu" not in text and "file://" not in text and "/opt/" not in text  # no machine paths
    pins = read_lock(ROOT / "requirements.lock")
    assert all(Version(v).local is None for v in pins.values())  # torch==X admits CPU and CUDA builds


def _readme_commands() -> list[str]:
    """The first line of each ```bash block in the README's Quickstart section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.strip().splitlines()[0] for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_ci_runs_the_readme_commands_word_for_word():
    install_and_quickstart, tests = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in (install_and_quickstart, tests):
        assert any(line.startswith(command + " ||") or line == command for line in ci), command
    assert "-c requirements.lock" in install_and_quickstart and "unimm quickstart" in install_and_quickstart
    assert "-c requirements.lock" in tests and tests.endswith("python -m pytest")
    torch = re.search(r"torch==(\S+)", install_and_quickstart)[1]
    assert read_lock(ROOT / "requirements.lock")["torch"] == torch
    assert f"TORCH={torch}\n" in (ROOT / "scripts" / "lock").read_text()


def test_readme_shows_the_quickstart_summary_as_printed():
    """The README's block has the lines the quickstart prints, in its order (CI compares values)."""
    from unimm.pipelines.quickstart import summary_lines

    def keys(lines: list[str]) -> list[str]:
        return [line.split(":", 1)[0].strip() for line in lines]

    made = {"losses": {"loss_gen": (2.0, 1.0), "loss_disc": (1.0, 0.5)}, "plots": ["a.png"]}
    made |= dict.fromkeys(
        ["caption_exact_match", "caption_word_accuracy", "qa_exact_match", "two_choice_accuracy"], 0.5
    )
    made |= {"text_to_image_r1": 0.1, "text_to_image_chance": 0.01, "target_learned_correlation": 0.7}
    made |= {"checkpoint": "run/step-000010", "seconds": 1.0}
    assert keys(readme_summary(ROOT / "README.md")) == keys(summary_lines(made, 10))
