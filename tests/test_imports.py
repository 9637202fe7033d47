"""The server's modules and the client's import each other one way: no cycles, not
even inside functions or under ``if TYPE_CHECKING:``."""

from __future__ import annotations

import ast
from pathlib import Path

import distributex

PACKAGE = Path(distributex.__file__).parent


def _imports(path: Path, package: str) -> set[str]:
    """The distributex names ``path`` imports anywhere in it (functions and
    ``if TYPE_CHECKING:`` blocks included); ``package`` is the one it lives in.

    ``from a.b import c`` yields ``a.b.c``: a module if ``c`` is one, else a
    name that :func:`import_graph` maps back to ``a.b``.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: counted from the importing module's package
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            if module == "distributex" or module.startswith("distributex."):
                found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("distributex."))
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        package = ".".join(parts[:-1])
        name = package if parts[-1] == "__init__" else ".".join(parts)
        graph[name] = _imports(path, package)
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


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A shortest import path from ``start`` back to itself, or None if there is none."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for target in sorted(graph[node]):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if target not in came_from:
                    came_from[target] = node
                    following.append(target)
        frontier = following
    return None


def test_the_server_modules_import_one_way() -> None:
    # The client is a package of its own, checked by the test below.
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
    for leaf in ("appkeys", "refusal", "limits", "audit", "query", "identity", "transport"):
        assert not graph[f"distributex.{leaf}"] & handlers, leaf


def test_the_client_modules_import_one_way() -> None:
    # Strict: a client module that takes a name from ``distributex.client``
    # itself runs the package's __init__, which imports the blocking client;
    # that is a cycle too. A cycle through a module outside the client counts.
    graph = import_graph()
    client = sorted(name for name in graph if name.split(".")[:2] == ["distributex", "client"])
    assert len(client) > 10, client  # the walk found the package
    found = [cycle for name in client if (cycle := cycle_through(graph, name)) is not None]
    assert found == []
