"""The layering rules of docs/architecture.md, checked by parsing every import."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "promptcache"


def imports_of(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (PKG / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module if node.level == 0 else f"promptcache.{package}.{node.module}")
        found[str(path.relative_to(PKG))] = names
    return found


def offenders(package: str, banned: tuple[str, ...]) -> list[str]:
    return [
        f"{file}: {name}"
        for file, names in imports_of(package).items()
        for name in names
        if any(name == b or name.startswith(b + ".") for b in banned)
    ]


def test_cache_is_torch_free_and_knows_no_engine():
    assert offenders("cache", ("torch", "promptcache.engine", "promptcache.model", "promptcache.server")) == []


def test_model_never_sees_requests():
    assert offenders("model", ("promptcache.engine", "promptcache.server", "promptcache.cache")) == []


def test_server_never_touches_tensors_or_cache_internals():
    # the CLI is the composition root: it builds the engine; every other module uses engine/api.py
    assert offenders("server", ("torch", "promptcache.model", "promptcache.cache")) == []
    engine_imports = [
        f"{file}: {name}"
        for file, names in imports_of("server").items()
        if file != "server/cli.py"
        for name in names
        if name.startswith("promptcache.engine") and name != "promptcache.engine.api"
    ]
    assert engine_imports == []


def test_engine_never_imports_the_server():
    assert offenders("engine", ("promptcache.server", "promptcache.bench")) == []


def test_the_check_sees_real_imports():
    # the parser must find what is there, or the tests above could never fail
    assert any("torch" in names for names in imports_of("model").values())
    assert any("promptcache.cache" in names for names in imports_of("engine").values())
