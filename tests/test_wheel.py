"""The package as a user installs it with ``pip install .``: a wheel that carries its recipes, and
whose ``unimm quickstart`` runs from any directory (not only from a checkout)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _build_wheel(tmp_path: Path) -> Path:
    # Built from a copy so that the checkout gets no build/ or egg-info; without build isolation so
    # that nothing is downloaded (setuptools and wheel come with the dev extra).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("unimm", "recipes"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            dist,
            src,
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("unimm-*.whl")
    return wheel


def test_wheel_ships_every_recipe_and_runs_the_quickstart_from_elsewhere(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    # The repository's top-level recipes/ is the wheel's unimm/recipes/, file for file; every module ships.
    recipes = {f"unimm/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / "recipes").rglob("*.yaml")}
    assert recipes and recipes == {n for n in names if n.startswith("unimm/recipes/")}
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "unimm").rglob("*.py")}
    assert modules <= names, modules - names

    # A fresh virtual environment holding only the wheel; the libraries it needs are borrowed from
    # this environment by a .pth line (which, unlike a site dir, does not run this environment's
    # .pth files, so an editable install of the checkout stays invisible).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "borrowed.pth").write_text("\n".join(sorted(outer)) + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            wheel,
        ],
        check=True,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run(
        [python, "-c", "import unimm.config as c; print(c.SHIPPED_RECIPES)"],
        cwd=elsewhere,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert where.startswith(site), where  # the wheel's copy, not the checkout

    listed = subprocess.run(
        [venv / "bin" / "unimm", "recipes"], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert listed.returncode == 0 and where in listed.stdout and "accelerate/ddp" in listed.stdout
    shown = subprocess.run(
        [venv / "bin" / "unimm", "recipes", "tiny-cpu"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert shown.stdout == f"# {where}/tiny-cpu.yaml\n{(ROOT / 'recipes' / 'tiny-cpu.yaml').read_text()}"

    small = ["--records", "40", "--eval-records", "30", "--steps", "2", "--workers", "1"]
    qs = subprocess.run(
        [venv / "bin" / "unimm", "quickstart", "--out", "qs", *small],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert qs.returncode == 0, qs.stderr[-3000:]
    assert "--recipe tiny-cpu" in qs.stdout and "$ unimm train" in qs.stdout
    summary = (elsewhere / "qs" / "summary.txt").read_text()
    assert summary.startswith("summary\n") and "qs/run/step-000002" in summary
