"""The router's layering: what it may import, and no import cycle inside it."""

from __future__ import annotations

import ast
from pathlib import Path

ROUTER = Path(__file__).resolve().parents[2] / "router"


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def router_graph() -> dict[str, set[str]]:
    modules = {f"router.{p.stem}": p for p in ROUTER.glob("*.py") if p.stem != "__init__"}
    return {name: imports_of(path) for name, path in modules.items()}


def test_no_router_module_imports_the_benchmarks_or_the_scheduler_request() -> None:
    offenders = {
        name: sorted(
            i for i in imported if i.split(".")[0] == "benchmarks" or i == "replicas.request"
        )
        for name, imported in router_graph().items()
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_router_package_has_no_import_cycle() -> None:
    graph = {
        name: {i for i in imported if i in router_graph()}
        for name, imported in router_graph().items()
    }
    visiting: set[str] = set()
    done: set[str] = set()
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        if name in done:
            return
        if name in visiting:
            cycles.append([*path[path.index(name) :], name])
            return
        visiting.add(name)
        for dep in sorted(graph[name]):
            visit(dep, [*path, name])
        visiting.discard(name)
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert cycles == []
