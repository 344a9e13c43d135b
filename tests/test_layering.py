"""No import circle: the package's modules form layers (config → pools → layer → targeting →
checkpoint → model → … → cli), and so do the benchmarks built on it; the server does not
import training.

The graph is read from the source with ``ast``, counting every import, also those inside
functions (an import deferred to call time still ties two modules in a circle); then every
module is imported in layer order, and the server alone in a fresh interpreter.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"moslora": ROOT / "src" / "moslora", "benchmarks": ROOT / "benchmarks"}
# scripts run by another venv's python (vLLM, llama-cpp-python), not modules of a package
SCRIPTS = ROOT / "benchmarks" / "interop"


def module_files() -> dict[str, Path]:
    """Every module of the project's packages by dotted name (a package by its ``__init__``)."""
    modules = {}
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            if path.is_relative_to(SCRIPTS):
                continue
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that module ``name`` imports.

    ``from p import x`` depends on module ``p.x`` if there is one, else on ``p`` (x is its
    attribute). The parent packages that Python initialises on the way are not counted: a
    package whose ``__init__`` imports its modules would otherwise sit in a circle with each.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return (found & known) - {name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported(name, path, set(files)) for name, path in files.items()}


def layer_order() -> list[str]:
    return list(TopologicalSorter(import_graph()).static_order())


def test_the_import_graph_has_no_circle() -> None:
    try:
        TopologicalSorter(import_graph()).prepare()
    except CycleError as err:
        pytest.fail(f"import circle: {' -> '.join(err.args[1])}")


def test_targeting_and_checkpoint_sit_below_the_model() -> None:
    graph = import_graph()
    assert "moslora.model" not in graph["moslora.checkpoint"]
    assert "moslora.model" not in graph["moslora.targeting"]
    assert "moslora.checkpoint" not in graph["moslora.targeting"]


def test_every_module_imports_in_layer_order() -> None:
    for name in layer_order():
        importlib.import_module(name)


def test_the_server_imports_without_the_training_stack_in_a_fresh_interpreter() -> None:
    script = ("import sys, moslora.serving.server\n"
              "print(sorted(m for m in ('moslora.train', 'transformers.trainer') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", f"the server imports the training stack: {done.stdout}"
