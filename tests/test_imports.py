"""The server's modules import each other one way: no cycles, not even inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import distributex

PACKAGE = Path(distributex.__file__).parent


def _imports(path: Path) -> set[str]:
    """The distributex modules ``path`` imports anywhere in it (functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "distributex":
                found.update(f"distributex.{alias.name}" for alias in node.names)
            elif node.module.startswith("distributex."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("distributex."))
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = _imports(path)
    known = set(graph)
    for name, targets in graph.items():
        # "from distributex.backends.base import X" names a module; a class is not one.
        graph[name] = {t if t in known else t.rpartition(".")[0] for t in targets} & known
        graph[name].discard(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first walk (each reported once, from where it closed)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_server_modules_import_one_way() -> None:
    # The client is a package of its own (its keeper and sync import each other).
    graph = {
        name: {t for t in targets if not t.startswith("distributex.client")}
        for name, targets in import_graph().items()
        if not name.startswith("distributex.client")
    }
    # A package's __init__ re-exporting its modules is not a cycle of the layer.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    assert cycles(graph) == []


def test_the_web_layer_leaves_know_nothing_of_the_handlers() -> None:
    graph = import_graph()
    handlers = {"distributex.httpapi", "distributex.auth", "distributex.ops", "distributex.server"}
    for leaf in ("appkeys", "refusal", "limits", "query", "identity", "transport"):
        assert not graph[f"distributex.{leaf}"] & handlers, leaf
