"""Every message, help text and docstring names only flags that exist, and every command that
reports progress or status takes `-q`.

The flags are read from the CLI itself (every command's and subcommand's options); the messages
are every string constant in the package (f-string pieces included). A flag of another tool
(TensorBoard, MLflow, accelerate, pip) is allowed only as listed here, beside the tool."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import typer.main
from typer.testing import CliRunner

from unimm.cli import app

ROOT = Path(__file__).parents[1] / "unimm"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9](?![\w-])")
OTHER_TOOLS = {
    "--logdir": "tensorboard --logdir RUN/trackers",
    "--backend-store-uri": "mlflow ui --backend-store-uri RUN/mlruns",
    "--num_processes": "accelerate launch --num_processes N",
    "--config_file": "accelerate launch --config_file FILE",
}
# Commands whose whole output is their result (a listing, a table of measurements): -q would
# have nothing to silence.
RESULT_ONLY = {
    "recipes",
    "config show",
    "bench prepare",
    "bench align",
    "bench train",
    "bench data",
    "bench retrieve",
    "bench index",
    "bench serve",
}


def commands(group=None, prefix: str = "") -> dict[str, object]:
    group = group or typer.main.get_command(app)
    out = {}
    for name, command in group.commands.items():
        full = f"{prefix}{name}"
        if hasattr(command, "commands"):
            out |= commands(command, f"{full} ")
        else:
            out[full] = command
    return out


def groups(group=None) -> list[object]:
    """The command groups (``unimm eval`` takes options of its own besides its subcommands)."""
    group = group or typer.main.get_command(app)
    out = [group]
    for command in group.commands.values():
        if hasattr(command, "commands"):
            out += groups(command)
    return out


def cli_flags() -> set[str]:
    flags = {"--help", "--version"}
    everything = [*commands().values(), *groups()]
    for command in everything:
        for param in command.params:
            flags |= {o for o in [*param.opts, *param.secondary_opts] if o.startswith("--")}
    return flags


def named_flags() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for flag in FLAG.findall(node.value):
                    found.setdefault(flag, set()).add(str(path.relative_to(ROOT.parent)))
    return found


def test_every_flag_named_anywhere_exists():
    real = cli_flags()
    wrong = {
        flag: where for flag, where in named_flags().items() if flag not in real and flag not in OTHER_TOOLS
    }
    assert not wrong, "flags that no command has:\n" + "\n".join(
        f"  {f}: {sorted(w)}" for f, w in sorted(wrong.items())
    )


def test_the_check_can_fail():
    assert "--format" in cli_flags() and "--formatt" not in cli_flags()
    assert FLAG.findall("pass --image-root DIR, or --set train.alpha=0 (not -q)") == ["--image-root", "--set"]


def test_every_command_that_reports_progress_takes_q():
    missing = [
        name
        for name, command in commands().items()
        if name not in RESULT_ONLY and not any("-q" in p.opts for p in command.params)
    ]
    assert not missing, f"no -q: {missing}"


def test_progress_off_a_terminal_is_log_lines(tmp_path, unimm_records):
    """Redirected (a log file, CI), a progress bar writes whole lines, never a redraw."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "unimm.cli", "prepare", str(unimm_records), "--out", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "\r" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("prepare: ")]
    assert lines and lines[-1].startswith("prepare: 12/12 [")
    quiet = subprocess.run(
        [
            sys.executable,
            "-m",
            "unimm.cli",
            "prepare",
            str(unimm_records),
            "--out",
            str(tmp_path / "q"),
            "-q",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "prepare: " not in quiet.stderr


def test_q_leaves_results_only(tmp_path, trained):
    import io
    import shutil

    from unimm.config import ChatOptions
    from unimm.inference.chat import one_shot

    checkpoint, index = trained
    opts = ChatOptions(model=str(checkpoint), index=str(index), top_k=1, prompt="red?", max_new_tokens=2)
    loud, quiet = io.StringIO(), io.StringIO()
    answer = one_shot(opts, loud)
    assert one_shot(opts, quiet, quiet=True) == answer
    assert "[retrieved: " in loud.getvalue() and "[retrieved" not in quiet.getvalue()
    result = CliRunner().invoke(
        app, ["export", "--model", str(checkpoint), "--out", str(tmp_path / "e"), "-q"]
    )
    assert result.exit_code == 0 and result.output == ""
    shutil.copytree(index, tmp_path / "index")  # the shared index stays without an ANN file
    result = CliRunner().invoke(app, ["index", "build", "--index", str(tmp_path / "index"), "-q"])
    assert result.exit_code == 0 and result.output == ""
