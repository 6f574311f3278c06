"""The house rules of ARCHITECTURE.md that code can check: imports go one way, functions stay
short enough to read as named steps."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import distributed_downloader

PACKAGE = Path(distributed_downloader.__file__).parent
LONGEST_FUNCTION = 60  # lines, docstring included: ~50 lines of code read as named steps


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def imported(name: str, tree: ast.Module, is_package: bool) -> Iterator[str]:
    """Every project module `name` imports, at its top or inside a function."""
    here = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, [base, node.module or ""]))
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def unit(name: str) -> str:
    """The room a module belongs to: a top-level module or a subpackage (fetch, prep, …)."""
    return ".".join(name.split(".")[:2])


def import_graph() -> dict[str, set[str]]:
    trees = modules()
    graph: dict[str, set[str]] = {}
    for name, tree in trees.items():
        is_package = (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()
        targets = {unit(target) for target in imported(name, tree, is_package) if target in trees}
        graph.setdefault(unit(name), set()).update(targets - {unit(name), PACKAGE.name})
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one room (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_two_rooms_import_each_other_even_inside_a_function() -> None:
    graph = import_graph()
    assert "distributed_downloader.fetch" in graph and graph["distributed_downloader.fetch"]
    assert cycles(graph) == []


def test_the_cycle_check_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_functions_read_as_named_steps() -> None:
    long = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_FUNCTION:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []
