"""The live dashboard: ``/dashboard`` (a page shipped in the package, no CDN), its data as JSON
(``/dashboard/api/state``) and as server-sent events (``/dashboard/api/events``), and ``/``.

Who sees what: on a server without API keys, everyone sees everything. With API keys, an operator
key (``--admin-keys``) sees every tenant and the server's memory and tiers; a tenant's key sees only
its own requests, totals and misses; no key is a 401. The page itself holds no data (it asks for a
key when the API answers 401 and sends it as a Bearer token).
"""

from __future__ import annotations

import asyncio
import html
import json
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse

from promptcache.engine.api import AsyncEngine
from promptcache.server import openapi
from promptcache.server.auth import is_operator, resolve_tenant
from promptcache.server.errors import ApiError
from promptcache.server.state import get_state

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
MAX_STREAMS = 16  # concurrent event streams per key scope (operators, each tenant); more get a 429
EVENT_INTERVAL_S = 1.0  # how often a stream looks for a change
HEARTBEAT_S = 15.0  # a comment line this often keeps proxies from closing an idle stream


class _Stream(StreamingResponse):
    """Releases its stream slot when the response ends, also when its body never started (the
    client left before the headers went out)."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def engine_view(aengine: AsyncEngine) -> dict[str, Any]:
    """The server-wide part: KV blocks by state, evictions, requests in the engine, lower tiers."""
    snap = aengine.snapshot()
    c = snap.counters
    return {
        "blocks": {"total": c["blocks_total"], "in_use": c["blocks_in_use"], "cached": c["blocks_cached"],
                   "free": c["blocks_empty"], "pinned": c.get("blocks_pinned", 0)},
        "evictions": c["blocks_evicted"],
        "early_evictions": c["early_evictions"],
        "preemptions": c["preemptions"],
        "requests_running": c["requests_running"],
        "requests_waiting": c["requests_waiting"],
        "tiers": {name: {k: v for k, v in row.items() if isinstance(v, int | float)}
                  for name, row in snap.tiers.items()},
        "cached_tokens_by_tier": dict(snap.cached_tokens_by_tier),
        "block_size": aengine.info.block_size,
        "replicas": replicas_view(snap.replicas, snap.routing),
    }


def replicas_view(replicas: dict[str, dict[str, int]], routing: dict[tuple[str, str], int]) -> list[dict[str, Any]]:
    """Engine replicas behind the ingress (``--replicas``) with their hit rates and the routing
    decisions that sent them requests; a single server is one local engine."""
    if not replicas:
        return [{"name": "local", "role": "single server"}]
    out = []
    for name, c in sorted(replicas.items()):
        prompt, cached = c.get("prompt_tokens", 0), c.get("cached_tokens", 0)
        routed = {reason: n for (replica, reason), n in routing.items() if replica == name}
        out.append({"name": name, "role": "engine replica", "prompt_tokens": prompt, "cached_tokens": cached,
                    "hit_rate": cached / prompt if prompt else 0.0, "routed": routed,
                    "running": c.get("requests_running", 0), "waiting": c.get("requests_waiting", 0)})
    return out


def add_dashboard(app: FastAPI, api_keys: dict[str, str] | None, admin_keys: Sequence[str]) -> None:
    operators = tuple(admin_keys)
    router = APIRouter(tags=["Dashboard"])
    streams: dict[str, int] = {}  # open event streams per key scope

    def scope(request: Request) -> tuple[bool, str | None]:
        """(operator, tenant filter): an operator sees all (filter None)."""
        if api_keys is None or is_operator(request, api_keys, operators):
            return True, None
        tenant = resolve_tenant(request, api_keys)  # 401 in OpenAI's envelope without a valid key
        return False, tenant

    async def state_for(request: Request, operator: bool, tenant: str | None) -> dict[str, Any]:
        state = get_state(request)
        view = state.activity.view(tenant)
        view["model"] = state.model_names[0]
        view["scope"] = "all" if operator else "tenant"
        view["tenant"] = tenant
        if operator:
            view["engine"] = await run_in_threadpool(engine_view, state.aengine)
            view["replicas"] = view["engine"]["replicas"]
        else:  # which replicas exist, not what they serve (that is every tenant's traffic)
            names = (await run_in_threadpool(state.aengine.snapshot)).replicas
            view["replicas"] = [{"name": n, "role": "engine replica"} for n in sorted(names)] or [
                {"name": "local", "role": "single server"}]
        return view

    @router.get("/dashboard/api/state", summary="The dashboard's data, once (JSON)",
                responses=openapi.DASHBOARD_STATE)
    async def dashboard_state(request: Request) -> JSONResponse:
        operator, tenant = scope(request)
        return JSONResponse(await state_for(request, operator, tenant))

    @router.get("/dashboard/api/events", summary="The dashboard's data as server-sent events, on every change",
                response_class=StreamingResponse, responses=openapi.DASHBOARD_EVENTS)
    async def dashboard_events(request: Request) -> StreamingResponse:
        operator, tenant = scope(request)
        who = "operator" if operator else f"tenant:{tenant}"  # each its own budget: no tenant locks others out
        if streams.get(who, 0) >= MAX_STREAMS:
            raise ApiError(429, f"too many dashboard streams open for this key (at most {MAX_STREAMS})",
                           headers={"Retry-After": "5"})
        streams[who] = streams.get(who, 0) + 1
        released = False

        def release() -> None:  # exactly once, whether or not the body ever started
            nonlocal released
            if not released:
                released = True
                streams[who] -= 1
                if not streams[who]:
                    del streams[who]

        activity = get_state(request).activity

        async def events() -> AsyncIterator[str]:
            try:
                last_version, quiet = -1, 0.0
                while not await request.is_disconnected():
                    # operators also see blocks move; a tenant's stream moves with its own requests only
                    if operator or activity.version_of(tenant) != last_version:
                        view = await state_for(request, operator, tenant)
                        last_version, quiet = view["version"], 0.0
                        yield f"event: state\ndata: {json.dumps(view)}\n\n"
                    elif quiet >= HEARTBEAT_S:
                        quiet = 0.0
                        yield ": keep-alive\n\n"
                    await asyncio.sleep(EVENT_INTERVAL_S)
                    quiet += EVENT_INTERVAL_S
            finally:
                release()

        return _Stream(events(), release, media_type="text/event-stream",
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.get("/dashboard", include_in_schema=False)
    async def dashboard_page() -> FileResponse:
        return FileResponse(STATIC / "dashboard.html", media_type="text/html")

    @router.get("/dashboard/{name}", include_in_schema=False)
    async def dashboard_asset(name: str) -> FileResponse:
        if name not in ASSETS:
            raise ApiError(404, f"no dashboard asset {name!r}")
        return FileResponse(STATIC / name, media_type=ASSETS[name])

    @router.get("/", include_in_schema=False)
    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(_INDEX.format(model=html.escape(get_state(request).model_names[0])))

    app.include_router(router)


_INDEX = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>promptcache</title>
<link rel="stylesheet" href="/dashboard/dashboard.css"></head>
<body class="index"><main>
<h1>promptcache</h1>
<p>Serving <code>{model}</code> with prompt caching.</p>
<ul>
<li><a href="/dashboard">Dashboard</a>: hit rate, requests, memory, tenants, misses, costs, live</li>
<li><a href="/docs">API reference</a> (Swagger UI) &middot; <a href="/redoc">ReDoc</a> &middot;
<a href="/openapi.json">openapi.json</a></li>
<li><a href="/health">/health</a> &middot; <a href="/metrics">/metrics</a> (Prometheus)</li>
</ul>
<p>OpenAI: <code>/v1/chat/completions</code>, <code>/v1/completions</code>, <code>/v1/responses</code>;
Anthropic: <code>/v1/messages</code>; Gemini: <code>/v1beta/models/{{model}}:generateContent</code>.</p>
</main></body></html>
"""
