"""CI's check of the quickstart summary against the README (``scripts/ci_checks.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from ci_checks import SUMMARY_FIGURES, check_summary, readme_bands, readme_summary, split_figures  # noqa: E402

README = ROOT / "README.md"


def _summary(tmp_path: Path, replace: dict[str, str] | None = None) -> Path:
    """The README's summary as the quickstart would write it, with ``replace``'s lines swapped in."""
    lines = []
    for line in readme_summary(README):
        label = line.split(":", 1)[0].strip()
        lines.append(f"    {label:<26}: 51.7 s" if label == "time" else line)
    for label, rest in (replace or {}).items():
        (k,) = [i for i, line in enumerate(lines) if line.split(":", 1)[0].strip() == label]
        lines[k] = f"    {label:<26}: {rest}"
    path = tmp_path / "summary.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_readme_summary_itself_passes_whatever_the_time(tmp_path):
    assert check_summary(_summary(tmp_path), README) == ([], [])


def test_a_figure_moved_inside_its_band_passes_with_a_note(tmp_path):
    low, high = readme_bands(README)["two-choice accuracy"]
    inside = round((low + high) / 2, 3)
    problems, notes = check_summary(
        _summary(tmp_path, {"two-choice accuracy": f"{inside} (chance 0.5)"}), README
    )
    assert problems == []
    assert len(notes) == 1 and notes[0].startswith(f"two-choice accuracy: {inside} ")


@pytest.mark.parametrize(
    ("label", "rest", "figure"),
    [
        # A model blind to the images answers the two-choice questions at chance.
        ("two-choice accuracy", "0.5 (chance 0.5)", "two-choice accuracy"),
        # An alignment that does not learn leaves loss_disc where it started.
        ("loss_disc", "1.415 -> 1.39 (mean of the first and last 150 steps)", "loss_disc last"),
        (
            "target–learned similarity",
            "correlation 0.12 (views of different documents)",
            "target–learned correlation",
        ),
    ],
)
def test_a_figure_outside_its_band_fails_naming_it(tmp_path, label, rest, figure):
    problems, _ = check_summary(_summary(tmp_path, {label: rest}), README)
    assert len(problems) == 1 and problems[0].startswith(f"{figure}: ") and "outside" in problems[0]


@pytest.mark.parametrize(
    ("label", "rest"),
    [
        ("text→image R@1", "0.105 (chance 0.02)"),  # another evaluation set: the chance moved
        ("checkpoint", "unimm-quickstart/run/step-001200"),
        ("loss_gen", "2.837 -> 0.308 (mean of the first and last 100 steps)"),
        ("QA exact match", "n/a"),
    ],
)
def test_anything_but_a_figure_must_equal_the_readme(tmp_path, label, rest):
    problems, _ = check_summary(_summary(tmp_path, {label: rest}), README)
    assert len(problems) == 1 and problems[0].startswith("README: ")


def test_a_missing_line_fails(tmp_path):
    path = _summary(tmp_path)
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines() if "plots" not in line))
    problems, _ = check_summary(path, README)
    assert any("lines" in p for p in problems)


def test_figures_are_split_from_the_rest_of_a_line():
    text, figures = split_figures(
        "    loss_gen                  : 2.837 -> 0.308 (mean of the first and last 150 steps)"
    )
    assert text == "    loss_gen                  : # -> # (mean of the first and last 150 steps)"
    assert figures == {"loss_gen first": 2.837, "loss_gen last": 0.308}
    text, figures = split_figures("    caption accuracy          : 0.516 exact, 0.903 of the words")
    assert (text, figures) == (
        "    caption accuracy          : # exact, # of the words",
        {"caption exact": 0.516, "caption words": 0.903},
    )
    assert split_figures("    checkpoint                : run/step-001500") == (
        "    checkpoint                : run/step-001500",
        {},
    )


def test_the_readme_bands_hold_its_figures_and_name_every_figure():
    bands = readme_bands(README)
    assert set(bands) == {name for names in SUMMARY_FIGURES.values() for name in names}
    for line in readme_summary(README):
        for name, value in split_figures(line)[1].items():
            low, high = bands[name]
            assert low <= value <= high, (name, value, bands[name])


def test_a_readme_without_the_band_table_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README.read_text().replace("| figure | CI accepts |", "| figure | accepted |"))
    with pytest.raises(SystemExit, match="CI accepts"):
        check_summary(_summary(tmp_path, {"QA exact match": "0.6"}), readme)
