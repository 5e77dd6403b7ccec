"""The package's layering: each job imports only the jobs below it, and no import cycles.

Layers, lowest first. A module may import its own layer and the layers below it, never above;
two different jobs on the same layer may not import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INSTALLED_ROOTS = ("router", "replicas", "events", "configs")

LAYERS: dict[str, int] = {
    "router": 0,
    "configs": 0,
    "events": 0,
    "replicas": 1,
    "router.index": 2,
    "router.policy": 2,
    "router.reuse": 2,
    "router.tier": 3,
    "router.config": 3,
    "router.core": 4,
    "router.openai": 5,
    "router.engines": 5,
    "router.service": 6,
    "replicas.http_server": 6,
    "router.app": 7,
}


def module_files() -> dict[str, Path]:
    """Every installed module by its import name (`kvroute.router.core`, ...)."""
    found: dict[str, Path] = {}
    for root in INSTALLED_ROOTS:
        for path in (REPO / root).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(("kvroute", *parts))] = path
    return found


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")


def imports_of(path: Path, *, runtime_only: bool = False) -> set[str]:
    """Every module a file imports, at any depth (lazy imports included).

    With `runtime_only`, imports under `if TYPE_CHECKING:` are left out: they never run.
    """
    tree = ast.parse(path.read_text())
    if runtime_only:
        for node in ast.walk(tree):
            if is_type_checking_block(node):
                node.body = []
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def job_of(module: str) -> str:
    """The layer key a module belongs to: its longest prefix in LAYERS."""
    parts = module.split(".")[1:]
    for depth in range(len(parts), 0, -1):
        key = ".".join(parts[:depth])
        if key in LAYERS:
            return key
    raise AssertionError(f"{module} belongs to no layer; add its package to LAYERS")


def graph(*, runtime_only: bool = False) -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(path, runtime_only=runtime_only) for name, path in files.items()}


def test_every_source_file_imports_the_project_under_the_kvroute_root() -> None:
    bare = {
        name: sorted(i for i in imported if i.split(".")[0] in (*INSTALLED_ROOTS, "benchmarks"))
        for name, imported in graph().items()
    }
    assert {name: found for name, found in bare.items() if found} == {}


def test_no_module_imports_a_job_above_its_own_or_beside_it() -> None:
    modules = graph()
    offenders: dict[str, list[str]] = {}
    for name, imported in modules.items():
        own = job_of(name)
        for target in imported:
            if target not in modules:
                continue
            other = job_of(target)
            if other != own and LAYERS[other] >= LAYERS[own]:
                offenders.setdefault(name, []).append(target)
    assert offenders == {}


def test_the_router_imports_neither_the_benchmarks_nor_the_scheduler_request() -> None:
    offenders = {
        name: sorted(
            i
            for i in imported
            if i.startswith("kvroute.benchmarks") or i == "kvroute.replicas.request"
        )
        for name, imported in graph().items()
        if name.startswith(("kvroute.router", "kvroute.events"))
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_package_has_no_import_cycle_at_run_time() -> None:
    modules = graph(runtime_only=True)
    edges = {name: {i for i in imported if i in modules} for name, imported in modules.items()}
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
        for dep in sorted(edges[name]):
            visit(dep, [*path, name])
        visiting.discard(name)
        done.add(name)

    for name in sorted(edges):
        visit(name, [])
    assert cycles == []
