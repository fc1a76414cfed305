"""How the exporters' modules depend on each other: no import cycle runs through exporters/ (imports
inside functions count too), and the ONNX export's file names come from one module that needs no
ONNX package, so the runtime can look for an export without importing onnx."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ONNX_MODULES = sorted("exporters.onnx" + ("" if p.stem == "__init__" else f".{p.stem}")
                      for p in (ROOT / "exporters" / "onnx").glob("*.py"))


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (top level and inside functions)."""
    files = {}
    for package in ("compressor", "exporters"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = path
    graph = {}
    for module, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            targets.update(n for n in names if n in files and n != module and not module.startswith(n + "."))
        graph[module] = targets
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), list(graph[start])
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    return seen


def test_no_import_cycle_runs_through_the_exporters():
    graph = import_graph()
    cyclic = sorted(m for m in graph if m.startswith("exporters") and m in reachable(graph, m))
    assert cyclic == []


@pytest.mark.parametrize("module", [*ONNX_MODULES, "compressor.runtime"])
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    """What the static graph misses: a package's __init__ runs on the import of any module below
    it (compressor/__init__ imports compressor.runtime, which imports exporters.onnx)."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_onnx_file_names_live_in_one_module_without_imports():
    from exporters.onnx import export, files, loader

    tree = ast.parse((ROOT / "exporters" / "onnx" / "files.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
    for name in ("ONNX_DIR", "DECODER_FILE", "SPARSE_FILE", "WEIGHTS_FILE", "MANIFEST_FILE"):
        assert getattr(export, name) == getattr(files, name)  # callers of export's names keep working
    assert loader.DECODER_FILE == files.DECODER_FILE
