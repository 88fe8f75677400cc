"""scripts/gpu-check: without CUDA it says so and exits 0; its goals and report are computed right."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "gpu-check"


def _module():
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "r")], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "no CUDA device on this machine" in done.stdout
    assert not (tmp_path / "r").exists()  # nothing measured, nothing written


def test_goals_and_the_markdown_report():
    gpu_check = _module()
    steps = {
        "bench align": {
            "ok": True,
            "seconds": 3.0,
            "output": "",
            "figures": {"triton_forward_ms": 0.8, "triton_speedup": 41.0},
        },
        "bench train": {"ok": True, "seconds": 60.0, "output": "", "figures": {"joint_vs_generative": 1.04}},
        "FSDP2 save and exact resume": {"ok": False, "seconds": 9.0, "output": "Traceback: boom"},
    }
    goals = gpu_check.goals(steps)
    assert goals["triton_forward_ms"] == {"value": 0.8, "goal": 1.0, "met": True}
    assert goals["triton_speedup"]["met"] is False  # 41× < 50×
    assert goals["joint_vs_generative"]["met"] is True
    assert goals["resume_max_rel_diff"] == {"value": None, "goal": 1e-5, "met": None}  # not measured
    report = {"device": "NVIDIA H200", "when": "now", "torch": "2.13", "triton": "3", "seconds": 72.0}
    text = gpu_check.markdown({**report, "steps": steps, "goals": goals})
    assert "| FSDP2 save and exact resume | **no** | 9.0 |" in text
    assert "## FSDP2 save and exact resume (failed)" in text and "Traceback: boom" in text
    assert "| triton_speedup | 41.0 | 50.0 | False |" in text
