"""The package's shape. Oracles: invariants read from the source itself (ast) — no module imports
the package root, the package-level import graph has no circle, the math layers know nothing of
nn.Module or transformers, no function is longer than 60 lines — and ``python -m lorq``."""

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import lorq

SRC = Path(lorq.__file__).parent
MAX_FUNCTION_LINES = 60
PURE = ("quant", "decompose")  # layers of plain tensors


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module named by an import statement of ``path`` (at any depth)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out


def unit(module: str) -> str:
    """lorq.quant.affine → lorq.quant: the package-level unit a module belongs to."""
    return ".".join(module.split(".")[:2])


SOURCES = {module_name(p): p for p in SRC.rglob("*.py")}


def test_no_module_imports_the_package_root():
    offenders = [m for m, p in SOURCES.items() if "lorq" in imports(p) and m != "lorq"]
    assert offenders == []


def test_package_import_graph_has_no_cycle():
    graph = defaultdict(set)
    for module, path in SOURCES.items():
        for target in imports(path):
            if target.startswith("lorq.") and unit(target) != unit(module) and module != "lorq":
                graph[unit(module)].add(unit(target))
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*stack, node])):
                return cycle
        state[node] = 2
        return None

    cycles = [c for n in sorted(graph) if n not in state and (c := visit(n, []))]
    assert cycles == []


def test_pure_layers_know_no_modules_or_transformers():
    for module, path in SOURCES.items():
        if unit(module).removeprefix("lorq.") not in PURE:
            continue
        names = imports(path)
        assert not any(n.startswith("transformers") for n in names), module
        assert "torch.nn" not in names and "nn.Module" not in path.read_text(), module
        assert not any(n.startswith(("lorq.nn", "lorq.io", "lorq.cli")) for n in names), module


def test_no_function_is_longer_than_60_lines():
    long = []
    for module, path in SOURCES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {lines}")
    assert long == []


def test_python_dash_m_lorq():
    done = subprocess.run(
        [sys.executable, "-m", "lorq", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for verb in ("compress", "finetune", "merge", "export", "presets"):
        assert verb in done.stdout
