"""The package's shape: no import cycles, and the LoRA toolkit stays free of project rules.

The imports are read with ``ast`` (nothing is imported), function-local and
``TYPE_CHECKING`` imports included: a cycle hidden in a function is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "charbuild"

#: What the toolkit (``charbuild.lora``) may import of the rest of the package: leaf helpers only.
TOOLKIT_MAY_IMPORT = ("charbuild.lora", "charbuild.errors", "charbuild.fsutil", "charbuild.checks")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` (module ``name``) imports, anywhere in its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module mod
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # charbuild.x.y.name -> charbuild.x.y
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    paths = {module_name(p, root): p for p in root.rglob("*.py")}
    modules = set(paths)
    return {name: imports_of(path, name, modules) for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    problems = []
    for component in cycles(graph):
        edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in component]
        problems.append("cycle: " + "; ".join(edges))
    assert not problems, "\n".join(problems)


def test_the_lora_toolkit_imports_no_project_rules():
    graph = import_graph()
    wrong = [f"{a} -> {b}" for a in sorted(graph) if a.startswith("charbuild.lora")
             for b in sorted(graph[a]) if not b.startswith(TOOLKIT_MAY_IMPORT)]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("source, expected", [
    ("from . import b\n", [["pkg.a", "pkg.b"]]),                 # b imports a back
    ("def f():\n    from .b import g\n", [["pkg.a", "pkg.b"]]),  # hidden in a function
    ("import os\n", []),
], ids=["module-level", "function-local", "no-cycle"])
def test_the_cycle_finder_sees_function_local_imports(tmp_path, source, expected):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(source)
    (pkg / "b.py").write_text("from .a import x\n")
    assert cycles(import_graph(pkg)) == expected


def test_no_test_module_imports_another():
    """Shared test helpers live in conftest.py or helper modules, never in a test module."""
    tests = Path(__file__).resolve().parent
    wrong = []
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            wrong += [f"{path.name} imports {n}" for n in names if n.split(".")[0].startswith("test_")]
    assert not wrong, "\n".join(wrong)


#: Rooms of a readable size (docs/architecture.md): split a module along a seam a newcomer would
#: guess before it passes these.
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def test_modules_and_functions_stay_a_readable_size():
    too_big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(PACKAGE.parent).as_posix()
        if text.count("\n") > MAX_MODULE_LINES:
            too_big.append(f"{rel}: {text.count(chr(10))} lines (> {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_big.append(f"{rel}:{node.lineno} {node.name}: {length} lines (> {MAX_FUNCTION_LINES})")
    assert not too_big, "\n".join(too_big)
