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


def test_the_routing_policy_is_pure():
    """cluster/policy.py decides from hashes and loads: no torch, no engine, no server, no Ray."""
    banned = ("torch", "promptcache.engine", "promptcache.model", "promptcache.server", "ray")
    assert [o for o in offenders("cluster", banned) if o.startswith("cluster/policy.py")] == []
    assert any(f == "cluster/policy.py" for f in imports_of("cluster"))


def test_the_cluster_uses_the_engine_api_and_only_its_deployments_build_engines():
    """cluster/ composes engine and server: the engine through engine/api.py (serve_app.py builds
    the engines, as server/cli.py does), never the model; Ray stays in cluster/, an optional extra."""
    assert [o for o in offenders("cluster", ("promptcache.model",)) if "serve_app.py" not in o] == []
    engine_imports = [f"{file}: {name}" for file, names in imports_of("cluster").items()
                      if file != "cluster/serve_app.py" for name in names
                      if name.startswith("promptcache.engine") and name != "promptcache.engine.api"]
    assert engine_imports == []
    for package in ("cache", "engine", "model"):
        assert offenders(package, ("ray", "promptcache.cluster")) == []
    # the server runs without Ray: only its CLI (the composition root) reaches cluster/, for --replicas
    assert [o for o in offenders("server", ("ray", "promptcache.cluster")) if not o.startswith("server/cli.py")] == []


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


def _module_graph() -> dict[str, set[str]]:
    """promptcache module -> the promptcache modules it imports (lazy imports inside functions too)."""
    modules = {
        "promptcache." + ".".join(p.relative_to(PKG).with_suffix("").parts).removesuffix(".__init__")
        for p in PKG.rglob("*.py")
    }
    modules = {m.removesuffix(".__init__") for m in modules}
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        name = "promptcache." + ".".join(path.relative_to(PKG).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            found = []
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from pkg import sub" imports the submodule; the package itself only for other names
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                found = subs + ([node.module] if len(subs) < len(node.names) else [])
            targets.update(f for f in found if f in modules and f != name)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_module_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "promptcache.engine.config" in _module_graph()["promptcache.cli"]
