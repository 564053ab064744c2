"""Gemini's explicit caches over HTTP: ``cachedContents`` create / get / list / patch / delete
(the store and its rules: server/cached_contents.py; the pins: ``LLMEngine.pin``)."""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool

from promptcache.engine.api import NO_RETENTION, RequestSpec
from promptcache.sequences import common_prefix_len
from promptcache.server import cached_contents as cc
from promptcache.server import openapi
from promptcache.server.body import JsonBody
from promptcache.server.errors import ApiError
from promptcache.server.gemini_contents import add_routes, messages_of, plan_for, tools_of
from promptcache.server.gemini_models import served_model
from promptcache.server.generation import Generation
from promptcache.server.prompt import TemplateMessage, build_chat_prompt, check_prompt_chars
from promptcache.server.schemas_gemini import CachedContentCreate, CachedContentPatch
from promptcache.server.state import ServerState, get_state, sampling_params, tenant_of

router = APIRouter(tags=["Gemini"])
Tenant = Annotated[str | None, Depends(tenant_of)]


def _lifetime(ttl: str | None, expire_time: str | None, now: float) -> float:
    if ttl is not None and expire_time is not None:
        raise ApiError(400, "set ttl or expireTime, not both")
    if expire_time is not None:
        try:
            expires = cc.parse_rfc3339(expire_time)
        except ValueError as e:
            raise ApiError(400, f"expireTime: {e}") from None
    else:
        seconds = float(ttl[:-1]) if ttl is not None else cc.DEFAULT_TTL_S
        expires = now + seconds
    if not (now < expires <= now + cc.MAX_TTL_S) or not math.isfinite(expires):
        raise ApiError(400, "the cached content must expire in the future and within 30 days")
    return expires


async def create_cache(request: Request, tenant: Tenant,
                       body: Annotated[CachedContentCreate, JsonBody(CachedContentCreate)]) -> dict[str, Any]:
    state = get_state(request)
    model = served_model(state, body.model, "createCachedContent")
    if not state.aengine.supports_pins:  # --replicas: refused before anything runs
        raise ApiError(501, "cached contents are not available with --replicas yet: a pin would hold the blocks "
                            "of one replica while requests go to any")
    now = state.cached_contents.clock()
    expires = _lifetime(body.ttl, body.expireTime, now)
    if not body.contents and body.systemInstruction is None:
        raise ApiError(400, "a cached content needs contents or a systemInstruction")
    messages = messages_of(body.contents, body.systemInstruction)
    tool_dicts, tools = tools_of(body.tools)
    plan_for(state, tools, body.toolConfig, False)  # a bad toolConfig is refused now, not at first use

    def render() -> tuple[list[int], list[int]]:
        """The cached content's ids, and the part of them that is a token prefix of a request that
        uses it (its render followed by a message): only that part can ever be a hit."""
        try:
            check_prompt_chars(sum(len(p) for m in messages for p in m.parts), state.max_prompt_chars)
            ids = build_chat_prompt(state.tokenizer, messages, tool_dicts, (), state.max_prompt_chars,
                                    state.max_model_len, add_generation_prompt=False).token_ids
            probe = [*messages, TemplateMessage("user", ("?",))]
            used = build_chat_prompt(state.tokenizer, probe, tool_dicts, (), state.max_prompt_chars,
                                     state.max_model_len + 64).token_ids
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        return ids, ids[: common_prefix_len(ids, used)]

    ids, reusable = await run_in_threadpool(render)
    store = state.cached_contents
    refusal = store.reserve(tenant, len(reusable), state.max_pinned_tokens, state.kv_capacity_tokens * 3 // 4)
    if refusal is not None:
        raise ApiError(400, refusal, code="FAILED_PRECONDITION")
    cid = cc.new_cache_id()
    pin_id = f"pin:{cid}"
    try:
        pinned = 0
        for _ in range(2):  # its blocks may be evicted between the pre-warm and the pin: once more then
            # compute the prefix (max_tokens 0: nothing generated), then hold its blocks
            spec = RequestSpec(f"cache-{cid}", ids, sampling_params(max_tokens=0), tenant, NO_RETENTION)
            gen = await Generation.start(state, request, "createCachedContent", spec)
            await gen.final(request)
            try:
                pinned = await run_in_threadpool(state.aengine.pin, pin_id, tenant, reusable, expires - now)
            except ValueError as e:  # the engine's own cap on pinned memory
                raise ApiError(400, f"{e}: the server's memory for cached contents is full", code=
                               "FAILED_PRECONDITION") from None
            if pinned >= len(reusable) // state.block_size * state.block_size:
                break
        content = cc.CachedContent(cid, model, body.displayName, now, now, expires, tuple(messages), tool_dicts,
                                   tools, body.toolConfig, ids, pin_id, reusable, pinned)
        store.add(tenant, content)
    except BaseException:
        await run_in_threadpool(state.aengine.unpin, pin_id)
        raise
    finally:
        store.release(tenant, len(reusable))
    return content.resource()


def _content(state: ServerState, tenant: str | None, cache_id: str) -> cc.CachedContent:
    content = state.cached_contents.get(tenant, cache_id)
    if content is None:
        raise ApiError(404, f"CachedContent not found (or expired): cachedContents/{cache_id}")
    return content


async def get_cache(cache_id: str, request: Request, tenant: Tenant) -> dict[str, Any]:
    return _content(get_state(request), tenant, cache_id).resource()


async def list_caches(request: Request, tenant: Tenant, pageSize: Annotated[int | None, Query(ge=1)] = None,
                      pageToken: str | None = None) -> dict[str, Any]:
    state = get_state(request)
    try:
        page, token = state.cached_contents.page(tenant, pageSize, pageToken)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    body: dict[str, Any] = {"cachedContents": [c.resource() for c in page]}
    if token:
        body["nextPageToken"] = token
    return body


async def update_cache(cache_id: str, request: Request, tenant: Tenant,
                       body: Annotated[CachedContentPatch, JsonBody(CachedContentPatch)],
                       updateMask: str | None = None) -> dict[str, Any]:
    state = get_state(request)
    content = _content(state, tenant, cache_id)
    if body.name is not None and body.name.removeprefix("cachedContents/") != cache_id:
        raise ApiError(400, "name: a cached content cannot be renamed (only ttl or expireTime can be updated)")
    if body.ttl is None and body.expireTime is None:
        raise ApiError(400, "only ttl or expireTime can be updated, and one of them is required")
    now = state.cached_contents.clock()
    expires = _lifetime(body.ttl, body.expireTime, now)
    if not await run_in_threadpool(state.aengine.repin, content.pin_id, expires - now):
        # the engine dropped it (its clock ran out first): hold the blocks again if they are still cached
        await run_in_threadpool(state.aengine.pin, content.pin_id, tenant, content.pin_ids, expires - now)
    updated = state.cached_contents.update(tenant, cache_id, expires)
    if updated is None:
        raise ApiError(404, f"CachedContent not found (or expired): cachedContents/{cache_id}")
    return updated.resource()


async def delete_cache(cache_id: str, request: Request, tenant: Tenant) -> dict[str, Any]:
    state = get_state(request)
    content = _content(state, tenant, cache_id)
    state.cached_contents.remove(tenant, cache_id)
    await run_in_threadpool(state.aengine.unpin, content.pin_id)
    return {}


G_ERRORS = openapi.gemini_errors((400, 401, 404, 408, 413, 429, 503))
G_READ = openapi.gemini_errors((400, 401, 404))
add_routes(router, [
    ("/cachedContents", create_cache, "POST", "Create a cached content (Gemini)", G_ERRORS, CachedContentCreate),
    ("/cachedContents", list_caches, "GET", "List cached contents (Gemini)", G_READ, None),
    ("/cachedContents/{cache_id}", get_cache, "GET", "Get a cached content (Gemini)", G_READ, None),
    ("/cachedContents/{cache_id}", update_cache, "PATCH", "Update a cached content's ttl or expireTime (Gemini)",
     G_READ, CachedContentPatch),
    ("/cachedContents/{cache_id}", delete_cache, "DELETE", "Delete a cached content (Gemini)", G_READ, None),
])
