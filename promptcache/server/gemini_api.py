"""The Gemini dialect: models, ``:generateContent``, ``:streamGenerateContent`` (``alt=sse``),
``:countTokens``, and explicit caches as resources (``cachedContents``).

Served under ``/v1beta`` and ``/v1`` (google-genai pointed at a base URL calls ``/v1``; there,
``GET /v1/models`` answers in Gemini's shape when the caller is a google-genai client). Keys come
from ``x-goog-api-key`` or ``?key=``. ``usageMetadata.cachedContentTokenCount`` is the exact
number of prompt tokens reused — from a cached content and implicit hits alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncGenerator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from promptcache.engine.api import NO_RETENTION, RequestOutput, RequestSpec, StructuredOutput
from promptcache.sequences import common_prefix_len
from promptcache.server import cached_contents as cc
from promptcache.server import misses, openapi
from promptcache.server.body import JsonBody
from promptcache.server.diagnosis import MESSAGES, SYSTEM, TOOLS, Part
from promptcache.server.errors import ApiError, error_json, gemini_error_body
from promptcache.server.gemini_models import list_models_json, model_json, served_model
from promptcache.server.generation import EventStream, Generation, guarded_events
from promptcache.server.openai_api import plan_tools
from promptcache.server.openai_format import before_marker, tier_split
from promptcache.server.prompt import TemplateMessage, build_chat_prompt, check_prompt_chars
from promptcache.server.schemas_gemini import (
    CachedContentCreate,
    CachedContentPatch,
    Content,
    GeminiCountTokensRequest,
    GenerateContentRequest,
    SystemContent,
    ToolConfig,
)
from promptcache.server.schemas_gemini import GeminiTool as GTool
from promptcache.server.state import ServerState, get_state, new_id, sampling_params, tenant_of
from promptcache.server.tools import Tool, ToolCall, ToolPlan

router = APIRouter(tags=["Gemini"])
Tenant = Annotated[str | None, Depends(tenant_of)]
PREFIXES = ("/v1beta", "/v1")


# ---- models ----------------------------------------------------------------------------------------


async def get_model(model: str, request: Request, tenant: Tenant) -> dict[str, Any]:
    state = get_state(request)
    return model_json(state, served_model(state, model, "get"))


async def list_models(request: Request, tenant: Tenant) -> dict[str, Any]:
    return list_models_json(get_state(request))


# ---- contents -> chat template messages ------------------------------------------------------------


def _messages(contents: list[Content], system: SystemContent | None, where: str = "contents") -> list[TemplateMessage]:
    out: list[TemplateMessage] = []
    if system is not None:
        out.append(TemplateMessage("system", tuple(_texts(system, "systemInstruction"))))
    pending: dict[str, list[str]] = {}  # function name -> ids of its calls not yet answered
    calls_made = 0
    for i, content in enumerate(contents):
        role = "assistant" if content.role == "model" else "user"
        texts, calls, results = [], [], []
        for j, part in enumerate(content.parts):
            at = f"{where}[{i}].parts[{j}]"
            _check_part(part, at)
            if part.functionCall is not None:
                cid = part.functionCall.id or f"call_{calls_made}"
                calls_made += 1
                pending.setdefault(part.functionCall.name, []).append(cid)
                calls.append({"id": cid, "type": "function", "function": {
                    "name": part.functionCall.name,
                    "arguments": json.dumps(part.functionCall.args or {}, ensure_ascii=False)}})
            elif part.functionResponse is not None:
                waiting = pending.get(part.functionResponse.name) or []
                cid = part.functionResponse.id or (waiting.pop(0) if waiting else f"call_{part.functionResponse.name}")
                results.append((cid, json.dumps(part.functionResponse.response or {}, ensure_ascii=False)))
            elif part.text is not None and not part.thought:
                texts.append(part.text)
        if texts or calls or not results:
            out.append(TemplateMessage(role, tuple(texts) or ("",), {"tool_calls": calls} if calls else {}))
        out += [TemplateMessage("tool", (text,), {"tool_call_id": cid}) for cid, text in results]
    return out


def _check_part(part: Any, at: str) -> None:
    extra = sorted((part.model_extra or {}).keys())
    if extra:
        raise ApiError(400, f"{at}: {extra[0]} parts are not supported by this server (text, functionCall and "
                            "functionResponse only)")
    kinds = [k for k in ("text", "functionCall", "functionResponse") if getattr(part, k) is not None]
    if len(kinds) != 1:
        raise ApiError(400, f"{at}: a part holds exactly one of text, functionCall, functionResponse")


def _texts(content: SystemContent, where: str) -> list[str]:
    out = []
    for j, part in enumerate(content.parts):
        extra = sorted((part.model_extra or {}).keys())
        if part.text is None or extra:
            raise ApiError(400, f"{where}.parts[{j}]: the system instruction is text only")
        out.append(part.text)
    return out


def _tools(tools: list[GTool] | None) -> tuple[list[dict[str, Any]] | None, list[Tool]]:
    dicts, plan = [], []
    for k, t in enumerate(tools or []):
        extra = sorted((t.model_extra or {}).keys())
        if extra:
            raise ApiError(400, f"tools[{k}]: {extra[0]} is not supported by this server (functionDeclarations only)")
        for d in t.functionDeclarations or []:
            params = d.parametersJsonSchema or (openapi_to_json_schema(d.parameters) if d.parameters else None)
            fn: dict[str, Any] = {"name": d.name}
            if d.description:
                fn["description"] = d.description
            if params:
                fn["parameters"] = params
            dicts.append({"type": "function", "function": fn})
            plan.append(Tool(d.name, params or {"type": "object"}))
    return (dicts or None), plan


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


_INT64_KEYS = ("maxLength", "minLength", "maxItems", "minItems", "maxProperties", "minProperties")


def openapi_to_json_schema(schema: Any) -> Any:
    """Gemini's OpenAPI subset (``type: OBJECT``, ``nullable``, int64 bounds as strings) -> JSON
    Schema. An object with ``properties`` and no ``additionalProperties`` allows no other keys (the
    subset's meaning; a JSON Schema given as ``parametersJsonSchema`` / ``responseJsonSchema`` is
    taken as it is)."""
    if isinstance(schema, list):
        return [openapi_to_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for raw_key, value in schema.items():
        key = _camel(raw_key)  # google-genai sends some keywords snake_case ("max_length")
        if key == "type" and isinstance(value, str):
            out["type"] = value.lower()
        elif key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {k: openapi_to_json_schema(v) for k, v in value.items()}
        elif key in ("items", "anyOf", "oneOf", "allOf", "not", "additionalProperties"):
            out[key] = openapi_to_json_schema(value)
        elif key in _INT64_KEYS and isinstance(value, str) and value.isdigit():
            out[key] = int(value)  # protobuf int64 fields travel as JSON strings ("maxLength": "12")
        elif key not in ("nullable", "propertyOrdering", "example"):
            out[key] = value
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False  # the subset's objects have the properties they declare, no others
    return out


def _plan(state: ServerState, tools: list[Tool], config: ToolConfig | None,
          formatted: bool) -> tuple[ToolPlan | None, StructuredOutput | None]:
    fc = config.functionCallingConfig if config is not None else None
    mode = (fc.mode if fc is not None else None) or "AUTO"
    allowed = fc.allowedFunctionNames if fc is not None else None
    if allowed:
        unknown = [n for n in allowed if n not in {t.name for t in tools}]
        if unknown:
            raise ApiError(400, f"toolConfig.functionCallingConfig.allowedFunctionNames: {unknown[0]!r} is not among "
                                "the functionDeclarations")
    if mode == "ANY":
        subset = [t for t in tools if not allowed or t.name in allowed]
        plan, forced = plan_tools(state, subset, "required", None, formatted, "responseSchema")
        return (ToolPlan(tools, plan.format, True) if plan is not None else None), forced
    return plan_tools(state, tools, "none" if mode == "NONE" else "auto", None, formatted, "responseSchema")


def _structured(body: GenerateContentRequest) -> StructuredOutput | None:
    g = body.generationConfig
    if g is None:
        return None
    schema = g.responseJsonSchema or (openapi_to_json_schema(g.responseSchema) if g.responseSchema else None)
    if g.responseMimeType != "application/json":
        if schema is not None:
            raise ApiError(400, "generationConfig.responseSchema needs responseMimeType 'application/json'")
        return None
    return StructuredOutput.json_schema(schema) if schema is not None else StructuredOutput("json_object")


def _refuse_unsupported(body: GenerateContentRequest) -> None:
    g = body.generationConfig
    if g is None:
        return
    if (g.candidateCount or 1) > 1:
        raise ApiError(400, "generationConfig.candidateCount: only 1 candidate is supported by this server")
    for name in ("presencePenalty", "frequencyPenalty"):
        if getattr(g, name):
            raise ApiError(400, f"generationConfig.{name} is not supported (only 0)")
    t = g.thinkingConfig
    if t is not None and (t.thinkingBudget or t.includeThoughts):
        raise ApiError(400, "generationConfig.thinkingConfig: the model does not think (thinkingBudget 0 only)")


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
        messages = [*cached.messages, *_messages(body.contents, None)]
        tool_dicts, tools, config = cached.tool_dicts, cached.tools, cached.tool_mode
    else:
        messages = _messages(body.contents, body.systemInstruction)
        (tool_dicts, tools), config = _tools(body.tools), body.toolConfig
    if not body.contents:
        raise ApiError(400, "contents: at least one content is required")
    try:
        prompt = build_chat_prompt(state.tokenizer, messages, tool_dicts, (), state.max_prompt_chars,
                                   state.max_model_len)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    return prompt.token_ids, messages, tool_dicts, tools, config


def _parts(messages: list[TemplateMessage], tool_dicts: list[dict[str, Any]] | None) -> list[Part]:
    parts = [Part(f"tools[{k}]", TOOLS, json.dumps(t, ensure_ascii=False)) for k, t in enumerate(tool_dicts or [])]
    for i, m in enumerate(messages):
        kind = SYSTEM if m.role == "system" else MESSAGES
        parts += [Part(f"contents[{i}].{m.role}", kind, p) for p in m.parts]
        if m.extra:
            parts.append(Part(f"contents[{i}].calls", kind, json.dumps(m.extra, ensure_ascii=False)))
    return parts


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
            if safe > sent:
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
    _refuse_unsupported(body)
    for content in state.cached_contents.expired():
        await run_in_threadpool(state.aengine.unpin, content.pin_id)
    cached = _cached(state, tenant, body)
    prompt_ids, messages, tool_dicts, tools, config = await run_in_threadpool(_prompt, state, body, cached)
    plan, forced = _plan(state, tools, config, _structured(body) is not None)
    g = body.generationConfig
    max_tokens = g.maxOutputTokens if g is not None else None
    if max_tokens is None:
        max_tokens = state.default_max_tokens(len(prompt_ids))
    params = sampling_params(max_tokens=max_tokens, temperature=g.temperature if g else None,
                             top_p=g.topP if g else None, top_k=g.topK if g else None, seed=g.seed if g else None,
                             stop=(g.stopSequences or None) if g else None, structured=forced or _structured(body))
    rid = new_id("")
    endpoint = "generateContent"
    gen = await Generation.start(state, request, endpoint, RequestSpec(rid, prompt_ids, params, tenant, NO_RETENTION))
    try:
        extra = await misses.response_fields(state, request, tenant, rid, lambda: _parts(messages, tool_dicts),
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


# ---- cachedContents ----------------------------------------------------------------------------------


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
    now = state.cached_contents.clock()
    expires = _lifetime(body.ttl, body.expireTime, now)
    if not body.contents and body.systemInstruction is None:
        raise ApiError(400, "a cached content needs contents or a systemInstruction")
    messages = _messages(body.contents, body.systemInstruction)
    tool_dicts, tools = _tools(body.tools)
    _plan(state, tools, body.toolConfig, False)  # a bad toolConfig is refused now, not at first use

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
_ROUTES: list[tuple[str, Any, str, str, dict[int | str, dict[str, Any]], Any]] = [
    # (path, handler, method, summary, responses, request body model)
    ("/models/{model}:generateContent", generate_content, "POST", "Generate content (Gemini)", G_ERRORS,
     GenerateContentRequest),
    ("/models/{model}:streamGenerateContent", stream_generate_content, "POST",
     "Generate content as server-sent events, alt=sse (Gemini)", {**openapi.GEMINI_SSE, **G_ERRORS},
     GenerateContentRequest),
    ("/models/{model}:countTokens", count_tokens_route, "POST", "Count tokens (Gemini)", G_READ,
     GeminiCountTokensRequest),
    ("/cachedContents", create_cache, "POST", "Create a cached content (Gemini)", G_ERRORS, CachedContentCreate),
    ("/cachedContents", list_caches, "GET", "List cached contents (Gemini)", G_READ, None),
    ("/cachedContents/{cache_id}", get_cache, "GET", "Get a cached content (Gemini)", G_READ, None),
    ("/cachedContents/{cache_id}", update_cache, "PATCH", "Update a cached content's ttl or expireTime (Gemini)",
     G_READ, CachedContentPatch),
    ("/cachedContents/{cache_id}", delete_cache, "DELETE", "Delete a cached content (Gemini)", G_READ, None),
]
for _prefix in PREFIXES:
    for _path, _handler, _method, _summary, _responses, _body in _ROUTES:
        router.add_api_route(_prefix + _path, _handler, methods=[_method], summary=_summary, responses=_responses,
                             response_model=None, operation_id=f"{_handler.__name__}{_prefix.replace('/', '_')}",
                             openapi_extra=openapi.json_request(_body) if _body is not None else None)
router.add_api_route("/v1beta/models", list_models, methods=["GET"], summary="List models (Gemini)",
                     responses=G_READ, operation_id="gemini_list_models")
router.add_api_route("/v1beta/models/{model}", get_model, methods=["GET"], summary="Get a model (Gemini)",
                     responses=G_READ, operation_id="gemini_get_model")
