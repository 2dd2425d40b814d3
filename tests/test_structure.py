"""The shape of `src/rim`: imports run downhill, functions and files stay small.

Every `import rim.x` counts, at the top of a module or inside a function: a function-level
import is still a climb back up. Importing `rim.a.b` from outside package `rim.a` also runs
`rim/a/__init__.py`, so it counts as an edge to `rim.a` too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / "rim").rglob("*.py"))}


def _imported(node: ast.AST, here: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
            pkg = here.split(".") if is_package else here.split(".")[:-1]
            pkg = pkg[: len(pkg) - node.level + 1]
            base = ".".join(pkg + ([base] if base else []))
        return [base] + [f"{base}.{a.name}" for a in node.names]
    return []


def _targets(node: ast.AST, here: str, is_package: bool, modules) -> set[str]:
    """`from pkg import mod` depends on `pkg.mod` (a module), `from mod import name` on `mod`."""
    names = _imported(node, here, is_package)
    if isinstance(node, ast.ImportFrom):
        base, subs = names[0], [n for n in names[1:] if n in modules]
        return set(subs) if len(subs) == len(names) - 1 and subs else {base}
    return set(names)


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the rim modules it imports (directly or through a package's __init__)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            for target in _targets(node, name, is_package, modules):
                if target in modules and target != name:
                    edges.add(target)
        for target in list(edges):  # rim.a.b from outside rim.a runs rim.a first
            parent = target.rsplit(".", 1)[0]
            if parent in modules and parent != "rim" and not name.startswith(parent + "."):
                if parent != name:
                    edges.add(parent)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path `[a, b, ..., a]`, or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_function_level_and_package_imports(tmp_path: Path):
    pkg = tmp_path / "rim" / "m"
    pkg.mkdir(parents=True)
    (tmp_path / "rim" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from rim.m.x import X\n")
    (pkg / "x.py").write_text("def f():\n    from rim.d import g\nX = 1\n")
    (tmp_path / "rim" / "d.py").write_text("from rim.m.x import X\n")
    mods = {
        "rim": tmp_path / "rim" / "__init__.py",
        "rim.m": pkg / "__init__.py",
        "rim.m.x": pkg / "x.py",
        "rim.d": tmp_path / "rim" / "d.py",
    }
    graph = import_graph(mods)
    assert graph["rim.d"] == {"rim.m.x", "rim.m"}
    assert find_cycle(graph) is not None  # m.x -> d -> m.x (inside a function)


def test_no_import_cycle_in_rim():
    cycle = find_cycle(import_graph(_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _long_functions(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                out.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    return out


@pytest.mark.parametrize("name", sorted(_modules()))
def test_functions_and_files_are_small(name: str):
    path = _modules()[name]
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_FILE_LINES, f"{path.relative_to(SRC)}: {lines} lines"
    assert not _long_functions(path)
