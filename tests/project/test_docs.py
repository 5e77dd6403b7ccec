"""docs/architecture.md cannot drift: what it names exists, and its config table has every key."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import msgspec

from kvroute.router.config import Config

REPO = Path(__file__).resolve().parents[2]
ARCHITECTURE = REPO / "docs" / "architecture.md"
SOURCE_ROOTS = ("router", "replicas", "events", "configs", "benchmarks")
TOP_FOLDERS = (*SOURCE_ROOTS, "tests", "docs", ".ci")

CODE_SPAN = re.compile(r"`([^`\n]+)`")
CAMEL = re.compile(r"^_?[A-Z][a-z0-9]+[A-Z][A-Za-z0-9]*$")
CLASS_MEMBER = re.compile(
    r"^(_?[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*)\.(_{0,2}[a-z][a-z0-9_]*)(\(\))?$"
)
PRIVATE_OR_CALL = re.compile(r"^(_[a-z][a-z0-9_]*|[a-z][a-z0-9_]*\(\))$")
# Names the document quotes from other projects (vLLM, msgspec, aiohttp, Ray, HF).
FOREIGN = {
    "BlockHashWithGroupId",
    "CachedRequestState",
    "EngineCore",
    "FreeKVCacheBlockQueue",
    "KVCacheBlock",
    "KVConnector",
    "KVEventAggregator",
    "KVCacheCoordinator",
    "LlamaForCausalLM",
    "NamedTuple",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "PreTrainedTokenizerFast",
    "StreamResponse",
    "ThreadAuthenticator",
    "ZmqEventPublisher",
}


@cache
def definitions() -> tuple[frozenset[str], dict[str, frozenset[str]]]:
    """Every name the sources define, and every class's members (methods, fields, attributes)."""
    names: set[str] = set()
    members: dict[str, set[str]] = {}
    for root in SOURCE_ROOTS:
        for path in (REPO / root).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    names.add(node.name)
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    names.add(node.id)
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                    names.add(node.attr)
                if isinstance(node, ast.ClassDef):
                    owned = members.setdefault(node.name, set())
                    for inner in ast.walk(node):
                        if isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef):
                            owned.add(inner.name)
                        elif isinstance(inner, ast.AnnAssign) and isinstance(
                            inner.target, ast.Name
                        ):
                            owned.add(inner.target.id)
                        elif isinstance(inner, ast.Attribute) and isinstance(inner.ctx, ast.Store):
                            owned.add(inner.attr)
                        elif isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Store):
                            owned.add(inner.id)
    return frozenset(names), {name: frozenset(found) for name, found in members.items()}


def spans() -> list[str]:
    return CODE_SPAN.findall(ARCHITECTURE.read_text(encoding="utf-8"))


def test_every_repository_path_the_architecture_names_exists() -> None:
    paths = {
        span.split(" ")[0].rstrip(":")
        for span in spans()
        if span.split("/")[0] in TOP_FOLDERS and "<" not in span and "*" not in span
    }
    assert paths, "the document names files"
    assert sorted(p for p in paths if not (REPO / p).exists()) == []


def is_undefined_name(span: str, names: frozenset[str]) -> bool:
    """A class-like or private name, or a `call()`, that no source file defines."""
    if CAMEL.match(span):
        return span not in FOREIGN and span not in names
    if PRIVATE_OR_CALL.match(span):
        return span.removesuffix("()") not in names
    return False


def test_every_class_method_and_private_name_the_architecture_names_is_defined() -> None:
    names, members = definitions()
    missing = set()
    for span in spans():
        if (match := CLASS_MEMBER.match(span)) is not None:
            owner, member = match.group(1), match.group(2)
            if owner not in FOREIGN and member not in members.get(owner, frozenset()):
                missing.add(span)
        elif is_undefined_name(span, names):
            missing.add(span)
    assert sorted(missing) == []


def struct_keys(struct: type) -> list[str]:
    return [field.encode_name for field in msgspec.structs.fields(struct)]


def config_table() -> dict[str, str]:
    """The rows of the `| section | keys |` table, by section name."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    table = text[text.index("| section | keys |") :].split("\n\n", 1)[0]
    rows: dict[str, str] = {}
    for line in table.splitlines()[2:]:
        section, keys = line.strip("|").split("|", 1)
        rows[section.strip().split(" ")[0].strip("`").removesuffix("[]")] = keys
    return rows


def test_the_config_table_lists_every_key_of_every_section() -> None:
    rows = config_table()
    missing: dict[str, list[str]] = {}
    for field in msgspec.structs.fields(Config):
        struct = field.type.__args__[0] if field.name == "external" else field.type
        row = rows.get(field.encode_name, "")
        absent = [
            key for key in struct_keys(struct) if f"`{key}`" not in row and f"`{key}[]`" not in row
        ]
        if absent:
            missing[field.encode_name] = absent
    assert missing == {}
