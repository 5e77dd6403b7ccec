"""Mutation testing of the core modules: do the fast tests catch small bugs?

Each mutant is one small AST change to one core module: a comparison operator
swapped (< for <=, == for !=, in for not in, ...), an integer constant moved
by one, a boolean constant, `and`/`or` or a `not` flipped, + for -, a return
value replaced by None, or a statement replaced by `pass`. Mutants run one at
a time in a scratch copy of the repository: the mutated module is written
there and the fast tests that cover it run with `-x`. A failing (or hanging)
test run kills the mutant; one that passes survives, and is either a missing
test or an equivalent mutant (same behaviour, e.g. a bound that is never
reached).

Not part of CI: a full run takes hours on two cores. Sample instead:

    python -m benchmarks.mutate --limit 60 --seed 1      # a reproducible sample
    python -m benchmarks.mutate --module events/sequencer.py --list
    python -m benchmarks.mutate --root /tmp/other-tree   # another checkout's tests

The same sources, `--limit` and `--seed` give the same mutants, so scores of
two test suites on one sample compare directly.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
FAST = "not slow and not ray"

# Core module globs -> the fast tests that cover them, quickest killers first
# (pytest runs files in the order given and stops at the first failure).
TARGETS: dict[str, tuple[str, ...]] = {
    "router/index/*.py": (
        "tests/router/test_block_table.py",
        "tests/router/test_index.py",
        "tests/router/test_index_differential.py",
    ),
    "router/openai/protocol.py": ("tests/router/test_protocol.py",),
    "events/sequencer.py": (
        "tests/events/test_sequencer.py",
        "tests/events/test_stream.py",
        "tests/events/test_faults.py",
    ),
    "replicas/kv_cache/*.py": (
        "tests/replicas/test_block_pool.py",
        "tests/replicas/test_segmented.py",
        "tests/replicas/test_kv_cache_manager.py",
        "tests/replicas/test_block_hashes.py",
        "tests/replicas/test_prefix_caching.py",
        "tests/replicas/test_differential.py",
        "tests/router/test_index_differential.py",
    ),
}

# Copied into the scratch tree (everything the tests import or read).
TREE = ("router", "events", "replicas", "benchmarks", "tests", "configs", "pyproject.toml")

COMPARE_SWAPS: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
BINOP_SWAPS: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
}
REMOVABLE = (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Raise)


@dataclass(frozen=True)
class Mutant:
    module: str  # path relative to the root
    site: int  # index among the module's mutation sites (the same walk every time)
    line: int
    description: str


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # killed | survived | timeout | no-tests
    seconds: float


def _skipped_nodes(tree: ast.Module) -> set[int]:
    """Ids of nodes never mutated: docstrings, `...`, annotations, decorators,
    imports, `__slots__` and TYPE_CHECKING blocks."""
    skip: set[int] = set()

    def drop(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            drop(body[0])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for decorator in node.decorator_list:  # @njit(cache=True), @dataclass(frozen=True)
                drop(decorator)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            drop(node)  # `...` bodies of protocols
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            drop(node.returns)
            for arg in (*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs):
                drop(arg.annotation)
            drop(node.args.vararg)
            drop(node.args.kwarg)
        if isinstance(node, ast.AnnAssign):
            drop(node.annotation)
            if node.value is None:
                drop(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            drop(node)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            drop(node)
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets
        ):
            drop(node)
    return skip


def _binds_locals(node: ast.AST) -> bool:
    """`x = ...` or `a, b = ...`: removing it is a NameError, which any test
    reaching it reports, so such mutants say nothing and are not made."""
    if not isinstance(node, (ast.Assign, ast.AnnAssign)):
        return False
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    names = (ast.Name, ast.Tuple, ast.Starred)
    return all(
        isinstance(n, names)
        for t in targets
        for n in ast.walk(t)
        if not isinstance(n, ast.expr_context)
    )


def _sites(tree: ast.Module) -> Iterator[tuple[ast.AST, str, int]]:
    """(node, kind, option) for every mutation of the module, in a fixed order."""
    skip = _skipped_nodes(tree)
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(s) for s in ast.walk(node) if s is not node)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in COMPARE_SWAPS:
                    yield node, "compare", i
        elif isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAPS:
            yield node, "binop", 0
        elif isinstance(node, ast.BoolOp):
            yield node, "boolop", 0
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            yield node, "not", 0
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool):
                yield node, "bool", 0
            elif isinstance(node.value, int):
                yield node, "int", +1
                yield node, "int", -1
        if (
            isinstance(node, ast.Return)
            and node.value is not None
            and not (isinstance(node.value, ast.Constant) and node.value.value is None)
        ):
            yield node, "return", 0
        if isinstance(node, REMOVABLE) and id(node) in in_function and not _binds_locals(node):
            yield node, "remove", 0


def _describe(node: ast.AST, kind: str, option: int) -> str:
    if kind == "compare":
        assert isinstance(node, ast.Compare)
        old = type(node.ops[option])
        return f"{old.__name__} -> {COMPARE_SWAPS[old].__name__} in `{ast.unparse(node)}`"
    if kind == "binop":
        assert isinstance(node, ast.BinOp)
        new = BINOP_SWAPS[type(node.op)].__name__
        return f"{type(node.op).__name__} -> {new} in `{ast.unparse(node)}`"
    if kind == "boolop":
        return f"and/or flipped in `{ast.unparse(node)}`"
    if kind == "not":
        return f"`{ast.unparse(node)}` -> without not"
    if kind == "bool":
        assert isinstance(node, ast.Constant)
        return f"{node.value} -> {not node.value}"
    if kind == "int":
        assert isinstance(node, ast.Constant)
        return f"{node.value} -> {node.value + option}"
    if kind == "return":
        return f"`{ast.unparse(node)}` -> return None"
    return f"removed `{ast.unparse(node).splitlines()[0]}`"


def _apply(node: ast.AST, kind: str, option: int) -> ast.AST:
    """Mutate `node` in place, or return its replacement (statements)."""
    if kind == "compare":
        assert isinstance(node, ast.Compare)
        node.ops[option] = COMPARE_SWAPS[type(node.ops[option])]()
    elif kind == "binop":
        assert isinstance(node, ast.BinOp)
        node.op = BINOP_SWAPS[type(node.op)]()
    elif kind == "boolop":
        assert isinstance(node, ast.BoolOp)
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif kind == "not":
        assert isinstance(node, ast.UnaryOp)
        return node.operand
    elif kind == "bool":
        assert isinstance(node, ast.Constant)
        node.value = not node.value
    elif kind == "int":
        assert isinstance(node, ast.Constant)
        node.value = node.value + option
    elif kind == "return":
        assert isinstance(node, ast.Return)
        node.value = None
    elif kind == "remove":
        return ast.Pass()
    return node


class _Replace(ast.NodeTransformer):
    def __init__(self, target: ast.AST, replacement: ast.AST) -> None:
        self.target, self.replacement = target, replacement

    def visit(self, node: ast.AST) -> ast.AST:
        if node is self.target:
            return self.replacement
        return self.generic_visit(node)


def mutants_of(root: Path, module: str) -> list[Mutant]:
    tree = ast.parse((root / module).read_text(), module)
    return [
        Mutant(module, i, getattr(node, "lineno", 0), _describe(node, kind, option))
        for i, (node, kind, option) in enumerate(_sites(tree))
    ]


def mutated_source(root: Path, mutant: Mutant) -> str:
    tree = ast.parse((root / mutant.module).read_text(), mutant.module)
    for i, (node, kind, option) in enumerate(_sites(tree)):
        if i == mutant.site:
            replacement = _apply(node, kind, option)
            if replacement is not node:
                tree = _Replace(node, replacement).visit(tree)
            return ast.unparse(ast.fix_missing_locations(tree)) + "\n"
    raise IndexError(f"{mutant.module} has no mutation site {mutant.site}")


def target_modules(root: Path, only: list[str]) -> dict[str, tuple[str, ...]]:
    """Module path -> its test files (those present under root)."""
    found: dict[str, tuple[str, ...]] = {}
    for pattern, tests in TARGETS.items():
        for path in sorted(root.glob(pattern)):
            module = path.relative_to(root).as_posix()
            if path.name == "__init__.py" or (only and module not in only):
                continue
            found[module] = tuple(t for t in tests if (root / t).exists())
    return found


# Where the scratch tree's `kvroute` package is built (see `_scratch`).
IMPORT_ROOT = ".import-root"


def _scratch(root: Path) -> Path:
    """A copy of the tree whose folders import as `kvroute.<folder>`: a regular
    `kvroute` package under IMPORT_ROOT links to them, and, first on PYTHONPATH, it
    shadows the editable install (whose finder Python asks only after sys.path)."""
    scratch = Path(tempfile.mkdtemp(prefix="kvroute-mutate-"))
    package = scratch / IMPORT_ROOT / "kvroute"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in TREE:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, scratch / name, ignore=shutil.ignore_patterns("results"))
            (package / name).symlink_to(scratch / name, target_is_directory=True)
        elif src.exists():
            shutil.copy2(src, scratch / name)
    return scratch


def _pytest(scratch: Path, tests: tuple[str, ...], timeout_s: float) -> tuple[int | None, float]:
    """Exit code (None on timeout) and seconds of one fast-test run in `scratch`."""
    path = os.pathsep.join((str(scratch / IMPORT_ROOT), str(scratch)))
    env = {**os.environ, "PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", FAST]
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [*command, *tests],
            cwd=scratch,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - started
    return done.returncode, time.perf_counter() - started


def run(root: Path, mutants: list[Mutant], tests: dict[str, tuple[str, ...]]) -> list[Outcome]:
    scratch = _scratch(root)
    outcomes: list[Outcome] = []
    try:
        # Baseline: each module's tests must pass unmutated; their time sets the timeout.
        timeouts: dict[tuple[str, ...], float] = {}
        for module in sorted({m.module for m in mutants}):
            if not tests[module] or tests[module] in timeouts:
                continue
            code, seconds = _pytest(scratch, tests[module], 1800)
            if code != 0:
                raise SystemExit(f"the tests of {module} fail unmutated (exit {code})")
            timeouts[tests[module]] = max(60.0, 4 * seconds)
        for mutant in tqdm(mutants, desc="mutants", unit="mutant"):
            if not tests[mutant.module]:
                outcomes.append(Outcome(mutant, "no-tests", 0.0))
                continue
            path = scratch / mutant.module
            original = path.read_text()
            path.write_text(mutated_source(root, mutant))
            try:
                code, seconds = _pytest(
                    scratch, tests[mutant.module], timeouts[tests[mutant.module]]
                )
            finally:
                path.write_text(original)
            # 0: every test passed. 5: none collected. Anything else (failures,
            # errors at import or collection) means the tests noticed.
            status = "timeout" if code is None else "survived" if code in (0, 5) else "killed"
            outcomes.append(Outcome(mutant, status, seconds))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return outcomes


def report(outcomes: list[Outcome], show_survivors: bool) -> str:
    rows = []
    by_module: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        by_module.setdefault(outcome.mutant.module, []).append(outcome)
    header = (
        f"{'module':<36} {'mutants':>7} {'killed':>7} {'timeout':>7} {'survived':>8} {'score':>6}"
    )
    rows.append(header)
    rows.append("-" * len(header))
    totals = [0, 0, 0, 0]
    for module, items in sorted(by_module.items()):
        killed = sum(o.status == "killed" for o in items)
        timeout = sum(o.status == "timeout" for o in items)
        survived = sum(o.status in ("survived", "no-tests") for o in items)
        score = (killed + timeout) / len(items)
        rows.append(
            f"{module:<36} {len(items):>7} {killed:>7} {timeout:>7} {survived:>8} {score:>6.0%}"
        )
        for i, n in enumerate((len(items), killed, timeout, survived)):
            totals[i] += n
    total, killed, timeout, survived = totals
    score = (killed + timeout) / total if total else 0.0
    rows.append("-" * len(header))
    rows.append(f"{'total':<36} {total:>7} {killed:>7} {timeout:>7} {survived:>8} {score:>6.0%}")
    if show_survivors:
        rows.append("")
        rows.append("survivors:")
        for outcome in outcomes:
            if outcome.status in ("survived", "no-tests"):
                m = outcome.mutant
                note = " (no tests)" if outcome.status == "no-tests" else ""
                rows.append(f"  {m.module}:{m.line} [#{m.site}] {m.description}{note}")
    return "\n".join(rows)


def survivors_in(path: Path, mutants: list[Mutant]) -> list[Mutant]:
    """The mutants among `mutants` that survived the run recorded in `path`."""
    chosen: list[Mutant] = []
    for record in json.loads(path.read_text()):
        if record["status"] not in ("survived", "no-tests"):
            continue
        same = [
            m
            for m in mutants
            if m.module == record["module"] and m.description == record["description"]
        ]
        if not same:
            print(
                f"gone (the code changed): {record['module']}:{record['line']} "
                f"{record['description']}"
            )
            continue
        chosen.append(
            min(same, key=lambda m: (abs(m.line - record["line"]), abs(m.site - record["site"])))
        )
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="tree whose tests run")
    parser.add_argument("--module", action="append", default=[], help="only this module")
    parser.add_argument("--limit", type=int, help="a random sample of this many mutants")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument(
        "--survivors-of",
        type=Path,
        help="re-run the survivors recorded by an earlier --json run (matched by module, "
        "description and nearest line, so edits elsewhere in the module do not matter)",
    )
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument("--json", type=Path, help="write every outcome here")
    parser.add_argument("--quiet", action="store_true", help="no list of survivors")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    tests = target_modules(root, args.module)
    mutants = [m for module in tests for m in mutants_of(root, module)]
    if args.survivors_of is not None:
        mutants = survivors_in(args.survivors_of, mutants)
    elif args.limit is not None and args.limit < len(mutants):
        mutants = sorted(
            random.Random(args.seed).sample(mutants, args.limit),
            key=lambda m: (m.module, m.site),
        )
    if args.list:
        for m in mutants:
            print(f"{m.module}:{m.line} [#{m.site}] {m.description}")
        print(f"{len(mutants)} mutants")
        return
    outcomes = run(root, mutants, tests)
    print(report(outcomes, show_survivors=not args.quiet))
    if args.json is not None:
        args.json.write_text(
            json.dumps([{**asdict(o.mutant), **asdict(o)} for o in outcomes], indent=1)
        )


if __name__ == "__main__":
    main()
