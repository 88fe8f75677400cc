"""The package's layers: imports point one way only (docs/architecture.md).

    cli → pipelines → commands → training → benchmarks → inference → model | tiny → data → config → align

plus plumbing (``unimm``, ``errors``, ``utils``, ``plots``, ``outputs``) that any layer may import and that
imports only plumbing. Every import counts, also those inside functions and under
``TYPE_CHECKING``: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1] / "unimm"
PLUMBING = {"unimm", "unimm.errors", "unimm.utils", "unimm.plots", "unimm.outputs"}
RANKS = {
    "align": 1,
    "config": 2,
    "data": 3,
    "model": 4,
    "tiny": 4,  # beside model: neither imports the other
    "inference": 5,
    "benchmarks": 6,  # scored with inference's metrics and sessions
    "training": 7,  # evaluates benchmarks during training
    "commands": 8,
    "pipelines": 9,
    "cli": 10,
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The unimm modules ``path`` imports (``from pkg import submodule`` counts as the submodule)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "unimm"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("unimm"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
    return out


def _layer(module: str) -> str | None:
    return None if module in PLUMBING else module.split(".")[1]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_every_module_has_a_layer():
    for name in _graph():
        assert name in PLUMBING or _layer(name) in RANKS, f"{name}: add it to a layer in tests/test_layers.py"


def test_imports_point_down_only():
    wrong = []
    for name, targets in _graph().items():
        for target in targets:
            if name in PLUMBING:
                if target not in PLUMBING:
                    wrong.append(f"{name} (plumbing) imports {target}")
                continue
            if target in PLUMBING:
                continue
            mine, theirs = _layer(name), _layer(target)
            if RANKS[theirs] > RANKS[mine] or (RANKS[theirs] == RANKS[mine] and theirs != mine):
                wrong.append(f"{name} ({mine}) imports {target} ({theirs})")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_command_imports_another():
    graph = _graph()
    wrong = [
        f"{name} imports {target}"
        for name, targets in graph.items()
        if name.startswith("unimm.commands.")
        for target in targets
        if target.startswith("unimm.commands") and target != name
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            raise AssertionError("import cycle: " + " → ".join(cycle[cycle.index(cycle[-1]) :]))


def test_the_check_sees_a_wrong_import(tmp_path, monkeypatch):
    """The checks above can fail: a data module importing a command is reported."""
    modules = _modules()
    bad = tmp_path / "bad.py"
    bad.write_text("from unimm.commands import train\n")
    assert _imports(bad, modules) == {"unimm.commands.train"}
    assert RANKS[_layer("unimm.commands.train")] > RANKS[_layer("unimm.data.shards")]


LIMIT = 80  # lines; past it a function must say why in a comment starting "# Long"


def test_no_long_function_without_a_reason():
    unexplained = []
    for path in sorted(ROOT.rglob("*.py")):
        module = path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = lines[node.lineno - 1 : node.end_lineno]
                if len(body) > LIMIT and not any(line.strip().startswith("# Long") for line in body):
                    unexplained.append(f"{module}.{node.name}: {len(body)} lines; split it or say why")
    assert not unexplained, "\n".join(unexplained)
