"""The Gemini dialect: models, ``:generateContent``, ``:streamGenerateContent`` (``alt=sse``),
``:countTokens``, and explicit caches as resources (``cachedContents``).

Served under ``/v1beta`` and ``/v1`` (google-genai pointed at a base URL calls ``/v1``; there,
``GET /v1/models`` answers in Gemini's shape when the caller is a google-genai client). Keys come
from ``x-goog-api-key`` or ``?key=``. ``usageMetadata.cachedContentTokenCount`` is the exact
number of prompt tokens reused — from a cached content and implicit hits alike.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from promptcache.engine.api import NO_RETENTION, RequestOutput, RequestSpec
from promptcache.server import cached_contents as cc
from promptcache.server import misses, openapi
from promptcache.server.body import JsonBody
from promptcache.server.diagnosis import conversation_parts
from promptcache.server.errors import ApiError, error_json, gemini_error_body
from promptcache.server.gemini_contents import (
    add_routes,
    messages_of,
    plan_for,
    refuse_unsupported,
    structured_of,
    tools_of,
)
from promptcache.server.gemini_models import list_models_json, model_json, served_model
from promptcache.server.generation import EventStream, Generation, guarded_events
from promptcache.server.openai_format import before_marker, tier_split
from promptcache.server.prompt import TemplateMessage, build_chat_prompt
from promptcache.server.schemas_gemini import (
    GeminiCountTokensRequest,
    GenerateContentRequest,
    ToolConfig,
)
from promptcache.server.state import ServerState, get_state, new_id, sampling_params, tenant_of
from promptcache.server.tools import Tool, ToolCall, ToolPlan

router = APIRouter(tags=["Gemini"])
Tenant = Annotated[str | None, Depends(tenant_of)]


# ---- models ----------------------------------------------------------------------------------------


async def get_model(model: str, request: Request, tenant: Tenant) -> dict[str, Any]:
    state = get_state(request)
    return model_json(state, served_model(state, model, "get"))


async def list_models(request: Request, tenant: Tenant) -> dict[str, Any]:
    return list_models_json(get_state(request))


# ---- contents -> chat template messages ------------------------------------------------------------


# ---- generateContent -------------------------------------------------------------------------------


def _cached(state: ServerState, tenant: str | None, body: GenerateContentRequest) -> cc.CachedContent | None:
    if body.cachedContent is None:
        return None
    if body.systemInstruction is not None or body.tools or body.toolConfig is not None:
        raise ApiError(400, "CachedContent can not be used with GenerateContent request setting system_instruction, "
                            "tools or tool_config.\n\nProposed fix: move those values to CachedContent from "
                            "GenerateContent request.")
    content = state.cached_contents.get(tenant, body.cachedContent.removeprefix("cachedContents/"))
    if content is None:
        raise ApiError(404, f"CachedContent not found (or expired): {body.cachedContent}")
    return content


def _prompt(state: ServerState, body: GenerateContentRequest, cached: cc.CachedContent | None,
            ) -> tuple[list[int], list[TemplateMessage], list[dict[str, Any]] | None, list[Tool], ToolConfig | None]:
    if cached is not None:
        messages = [*cached.messages, *messages_of(body.contents, None)]
        tool_dicts, tools, config = cached.tool_dicts, cached.tools, cached.tool_mode
    else:
        messages = messages_of(body.contents, body.systemInstruction)
        (tool_dicts, tools), config = tools_of(body.tools), body.toolConfig
    if not body.contents:
        raise ApiError(400, "contents: at least one content is required")
    try:
        prompt = build_chat_prompt(state.tokenizer, messages, tool_dicts, (), state.max_prompt_chars,
                                   state.max_model_len)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    return prompt.token_ids, messages, tool_dicts, tools, config


def usage_metadata(out: RequestOutput) -> dict[str, Any]:
    u = out.usage
    meta: dict[str, Any] = {"promptTokenCount": u.prompt_tokens, "candidatesTokenCount": u.completion_tokens,
                            "totalTokenCount": u.prompt_tokens + u.completion_tokens,
                            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": u.prompt_tokens}]}
    if u.cached_tokens:
        meta["cachedContentTokenCount"] = u.cached_tokens
        meta["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": u.cached_tokens}]
    split = tier_split(u).get("promptcache_cached_tokens_by_tier")
    if split:  # the extension field, in this API's camelCase (the SDK drops fields it does not know)
        meta["promptcacheCachedTokensByTier"] = split
    return meta


def _finish(out: RequestOutput) -> str:
    return "MAX_TOKENS" if out.finish_reason == "length" else "STOP"


def _call_parts(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [{"functionCall": {"name": c.name, "args": c.arguments}} for c in calls]


def _response(rid: str, model: str, out: RequestOutput, plan: ToolPlan | None, extra: dict[str, Any]) -> dict[str, Any]:
    text, calls = plan.split(out.text) if plan is not None else (out.text, [])
    parts = ([{"text": text}] if text or not calls else []) + _call_parts(calls)
    return {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": _finish(out), "index": 0}],
            "usageMetadata": usage_metadata(out), "modelVersion": model, "responseId": rid, **extra}


def _stream(gen: Generation, rid: str, model: str, plan: ToolPlan | None,
            extra: dict[str, Any]) -> AsyncGenerator[str, None]:
    marker = plan.format.start if plan is not None and plan.parse else None

    def chunk(parts: list[dict[str, Any]], out: RequestOutput, last: bool) -> str:
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
        if last:
            candidate["finishReason"] = _finish(out)
        body = {"candidates": [candidate], "usageMetadata": usage_metadata(out), "modelVersion": model,
                "responseId": rid, **(extra if last else {})}
        return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

    async def events() -> AsyncGenerator[str, None]:
        out, sent = gen.first, 0
        while not out.finished:
            safe = len(out.text) if marker is None else before_marker(out.text, marker)
            if safe > sent or (out.new_token_ids and marker is None):  # one chunk per token, "" too
                yield chunk([{"text": out.text[sent:safe]}], out, False)
                sent = safe
            out = await gen.next()
        text, calls = plan.split(out.text) if plan is not None else (out.text, [])
        rest = text[sent:] if not calls else text[sent:] if len(text) > sent else ""
        parts = ([{"text": rest}] if rest or not calls else []) + _call_parts(calls)
        yield chunk(parts, out, True)

    def error_event(e: ApiError) -> str:
        return f"data: {error_json(gemini_error_body(e.status, e.message, e.code))}\n\n"

    return guarded_events(gen, events(), error_event)


async def generate(request: Request, tenant: str | None, model_path: str, body: GenerateContentRequest,
                   stream: bool) -> Response:
    state = get_state(request)
    model = served_model(state, model_path)
    refuse_unsupported(body)
    for content in state.cached_contents.expired():
        await run_in_threadpool(state.aengine.unpin, content.pin_id)
    cached = _cached(state, tenant, body)
    prompt_ids, messages, tool_dicts, tools, config = await run_in_threadpool(_prompt, state, body, cached)
    plan, forced = plan_for(state, tools, config, structured_of(body) is not None)
    g = body.generationConfig
    max_tokens = g.maxOutputTokens if g is not None else None
    if max_tokens is None:
        max_tokens = state.default_max_tokens(len(prompt_ids))
    params = sampling_params(max_tokens=max_tokens, temperature=g.temperature if g else None,
                             top_p=g.topP if g else None, top_k=g.topK if g else None, seed=g.seed if g else None,
                             stop=(g.stopSequences or None) if g else None, structured=forced or structured_of(body))
    rid = new_id("")
    endpoint = "generateContent"
    gen = await Generation.start(state, request, endpoint, RequestSpec(rid, prompt_ids, params, tenant, NO_RETENTION))
    try:
        extra = await misses.response_fields(state, request, tenant, rid,
                                             lambda: conversation_parts(tool_dicts, messages, "contents"),
                                             prompt_ids, gen.first, None, "", lambda d: None)
        gen.on_finish(misses.on_finish(state, tenant, endpoint, gen.ttft_s))
    except BaseException:
        await gen.close()
        raise
    if stream:
        return EventStream(_stream(gen, rid, model, plan, extra))
    out = await gen.final(request)
    return JSONResponse(_response(rid, model, out, plan, extra))


async def generate_content(model: str, request: Request, tenant: Tenant,
                           body: Annotated[GenerateContentRequest, JsonBody(GenerateContentRequest)]) -> Response:
    return await generate(request, tenant, model, body, stream=False)


async def stream_generate_content(model: str, request: Request, tenant: Tenant,
                                  body: Annotated[GenerateContentRequest, JsonBody(GenerateContentRequest)],
                                  alt: Annotated[Literal["sse"] | None, Query(description="sse: server-sent events "
                                                                              "(the only form served)")] = None,
                                  ) -> Response:
    return await generate(request, tenant, model, body, stream=True)


async def count_tokens_route(model: str, request: Request, tenant: Tenant,
                             body: Annotated[GeminiCountTokensRequest, JsonBody(GeminiCountTokensRequest)],
                             ) -> dict[str, Any]:
    return await count_tokens(request, tenant, model, body)


async def count_tokens(request: Request, tenant: str | None, model_path: str,
                       body: GeminiCountTokensRequest) -> dict[str, Any]:
    state = get_state(request)
    served_model(state, model_path, "countTokens")
    if body.generateContentRequest is None and not body.contents:
        raise ApiError(400, "contents or generateContentRequest is required")
    inner = body.generateContentRequest or GenerateContentRequest(contents=body.contents or [])
    cached = _cached(state, tenant, inner)
    ids, *_ = await run_in_threadpool(_prompt, state, inner, cached)
    out: dict[str, Any] = {"totalTokens": len(ids),
                           "promptTokensDetails": [{"modality": "TEXT", "tokenCount": len(ids)}]}
    if cached is not None:
        out["cachedContentTokenCount"] = cached.pinned
    return out


G_ERRORS = openapi.gemini_errors((400, 401, 404, 408, 413, 429, 503))
G_READ = openapi.gemini_errors((400, 401, 404))
_ROUTES: list[tuple[str, Any, str, str, dict[int | str, dict[str, Any]], Any]] = [
    # (path, handler, method, summary, responses, request body model)
    ("/models/{model}:generateContent", generate_content, "POST", "Generate content (Gemini)", G_ERRORS,
     GenerateContentRequest),
    ("/models/{model}:streamGenerateContent", stream_generate_content, "POST",
     "Generate content as server-sent events, alt=sse (Gemini)", {**openapi.GEMINI_SSE, **G_ERRORS},
     GenerateContentRequest),
    ("/models/{model}:countTokens", count_tokens_route, "POST", "Count tokens (Gemini)", G_READ,
     GeminiCountTokensRequest),
]
add_routes(router, _ROUTES)
router.add_api_route("/v1beta/models", list_models, methods=["GET"], summary="List models (Gemini)",
                     responses=G_READ, operation_id="gemini_list_models")
router.add_api_route("/v1beta/models/{model}", get_model, methods=["GET"], summary="Get a model (Gemini)",
                     responses=G_READ, operation_id="gemini_get_model")
