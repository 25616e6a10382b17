"""The package's import graph: no circle among the command-line modules, no private name imported across modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "fedlt"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(path: Path) -> list[ast.ImportFrom | ast.Import]:
    """Every import statement of the file, module-level and inside functions alike."""
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]


def _targets(node: ast.ImportFrom | ast.Import, modules: dict[str, Path]) -> set[str]:
    """The fedlt modules an import statement loads (``from pkg import sub`` loads ``pkg.sub`` when it is one)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    if not node.module or node.module not in modules:
        return set()
    subs = {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
    return subs or {node.module}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (as a path that returns to its start), or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_command_line_modules_import_no_circle():
    modules = _modules()
    cli = {name: path for name, path in modules.items() if name.startswith("fedlt.cli")}
    assert {"fedlt.cli.app", "fedlt.cli.parser", "fedlt.cli.errors", "fedlt.cli.sweep", "fedlt.cli.report"} <= set(cli)
    graph = {name: {t for node in _imports(path) for t in _targets(node, modules) if t in cli and t != name}
             for name, path in cli.items()}
    # The package itself re-exports its modules; a module of it importing the package would close a circle.
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_module_imports_a_private_name_of_another():
    modules = _modules()
    offenders = []
    for name, path in modules.items():
        for node in _imports(path):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedlt"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    offenders.append(f"{name}: from {node.module} import {', '.join(private)}")
    assert not offenders, "\n".join(offenders)


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
