"""The Anthropic dialect: ``/v1/messages`` (plain and SSE) and ``/v1/messages/count_tokens``."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from promptcache.engine.api import RequestOutput, RequestSpec, StructuredOutput
from promptcache.server import misses, openapi
from promptcache.server.anthropic_prompt import anthropic_usage, build_prompt
from promptcache.server.body import JsonBody
from promptcache.server.diagnosis import anthropic_diagnostics
from promptcache.server.errors import ApiError, anthropic_error_body, error_json
from promptcache.server.generation import EventStream, Generation, guarded_events
from promptcache.server.openai_format import before_marker
from promptcache.server.schemas_anthropic import CountTokensRequest, MessagesRequest
from promptcache.server.state import ServerState, get_state, new_id, sampling_params, tenant_of
from promptcache.server.tools import Tool, ToolCall, ToolPlan, detect

router = APIRouter(tags=["Anthropic"])
Tenant = Annotated[str | None, Depends(tenant_of)]


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _error_event(e: ApiError) -> str:
    return f"event: error\ndata: {error_json(anthropic_error_body(e.status, e.message))}\n\n"


def _stop(out: RequestOutput) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) in Anthropic's words."""
    if out.finish_reason == "length":
        return "max_tokens", None
    if isinstance(out.stop_reason, str):
        return "stop_sequence", out.stop_reason
    return "end_turn", None


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}


def tool_plan(state: ServerState, body: MessagesRequest) -> tuple[ToolPlan | None, StructuredOutput | None]:
    """The request's tools, and the grammar that forces a call (``tool_choice`` any / tool)."""
    kind = body.tool_choice.type if body.tool_choice is not None else "auto"
    name = body.tool_choice.name if body.tool_choice is not None else None
    if not body.tools:
        if kind in ("any", "tool"):
            raise ApiError(400, f"tool_choice.type: {kind!r} needs tools")
        return None, None
    tools = [Tool(t.name, t.input_schema or {"type": "object"}) for t in body.tools]
    plan = ToolPlan(tools, detect(state.tokenizer.chat_template), parse=kind != "none", id_prefix="toolu_")
    if kind in ("auto", "none"):
        return plan, None
    forced = plan.force(None if kind == "any" else name)
    if forced is None:
        raise ApiError(400, f"tool_choice.name: {name!r} is not among the tools")
    return plan, forced


def _message(rid: str, model: str, out: RequestOutput, streaming_start: bool = False,
             tools: ToolPlan | None = None) -> dict[str, Any]:
    if streaming_start:
        content: list[dict[str, Any]] = []
        stop_reason, stop_sequence = None, None
    else:
        text, calls = tools.split(out.text) if tools is not None else (out.text, [])
        content = [{"type": "text", "text": text}] if text else []
        content += [_tool_use(c) for c in calls]
        stop_reason, stop_sequence = ("tool_use", None) if calls else _stop(out)
    return {"id": rid, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": anthropic_usage(out.usage)}


@router.post("/v1/messages", summary="Create a message (Anthropic), streamed with stream=true",
             response_model=None, responses=openapi.ANTHROPIC_STREAMING,
             openapi_extra=openapi.json_request(MessagesRequest))
async def create_message(request: Request, tenant: Tenant,
                         body: Annotated[MessagesRequest, JsonBody(MessagesRequest)]) -> Response:
    state = get_state(request)
    model = state.check_model(body.model, anthropic=True)
    plan, forced = tool_plan(state, body)
    prompt = await run_in_threadpool(build_prompt, state.tokenizer, body, state.max_prompt_chars,
                                     state.max_model_len)
    params = sampling_params(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                             top_k=body.top_k, stop=body.stop_sequences, ignore_eos=body.ignore_eos,
                             structured=forced)
    rid = new_id("msg_")
    endpoint = "/v1/messages"
    spec = RequestSpec(rid, prompt.token_ids, params, tenant, prompt.retention)
    gen = await Generation.start(state, request, endpoint, spec)
    named = body.diagnostics.previous_message_id if body.diagnostics is not None else None
    try:
        extra = await misses.response_fields(state, request, tenant, rid, lambda: list(prompt.parts),
                                             prompt.token_ids, gen.first, named, "diagnostics", anthropic_diagnostics)
        gen.on_finish(misses.on_finish(state, tenant, endpoint, gen.ttft_s))
    except BaseException:  # the generation holds blocks: free them before the error goes out
        await gen.close()
        raise
    if body.stream:
        events = _message_events(gen, rid, model, extra, lambda out: misses.cost_field(state, out), plan)
        return EventStream(guarded_events(gen, events, _error_event))
    out = await gen.final(request)
    return JSONResponse({**_message(rid, model, out, tools=plan), **extra, **misses.cost_field(state, out)})


async def _message_events(gen: Generation, rid: str, model: str, extra: dict[str, Any],
                          cost: Callable[[RequestOutput], dict[str, Any]],
                          tools: ToolPlan | None = None) -> AsyncGenerator[str, None]:
    """message_start (with the input usage, known once the prompt ran, and any diagnosis), text
    deltas in one content block (opened at the first text), then any tool_use blocks (their input
    as one input_json_delta), message_delta with the cumulative usage and the cost, message_stop.
    With tools, text from where a call could begin is held back until the output is complete."""
    out = gen.first
    yield _event("message_start", {"type": "message_start", "message": {**_message(rid, model, out, True), **extra}})
    yield _event("ping", {"type": "ping"})
    marker = tools.format.start if tools is not None and tools.parse else None
    block_open = False
    sent = 0
    calls: list[ToolCall] = []
    while True:
        safe = len(out.text) if marker is None else before_marker(out.text, marker)
        if out.finished and tools is not None and marker is not None:
            _, calls = tools.split(out.text)
            # with calls, the content is what precedes the first call (offsets into the raw text)
            at = out.text.find(marker)
            safe = len(out.text) if not calls else max(sent, at if at >= 0 else 0)
        if safe > sent:
            if not block_open:
                block_open = True
                yield _event("content_block_start", {"type": "content_block_start", "index": 0,
                                                     "content_block": {"type": "text", "text": ""}})
            yield _event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                 "delta": {"type": "text_delta", "text": out.text[sent:safe]}})
            sent = safe
        elif out.new_token_ids and marker is None and not out.finished:
            # a token with no text yet (an incomplete UTF-8 sequence, one that decodes to nothing):
            # an event all the same, so the client sees every token when it is made
            yield _event("ping", {"type": "ping"})
        if out.finished:
            break
        out = await gen.next()
    index = 0
    if block_open:
        yield _event("content_block_stop", {"type": "content_block_stop", "index": 0})
        index = 1
    for k, call in enumerate(calls):
        block = {**_tool_use(call), "input": {}}
        yield _event("content_block_start", {"type": "content_block_start", "index": index + k, "content_block": block})
        yield _event("content_block_delta", {"type": "content_block_delta", "index": index + k, "delta": {
            "type": "input_json_delta", "partial_json": json.dumps(call.arguments, ensure_ascii=False)}})
        yield _event("content_block_stop", {"type": "content_block_stop", "index": index + k})
    stop_reason, stop_sequence = ("tool_use", None) if calls else _stop(out)
    yield _event("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                   "usage": anthropic_usage(out.usage), **cost(out)})
    yield _event("message_stop", {"type": "message_stop"})


@router.post("/v1/messages/count_tokens", summary="Count a request's prompt tokens (Anthropic)",
             responses=openapi.ANTHROPIC_COUNT, openapi_extra=openapi.json_request(CountTokensRequest))
async def count_tokens(request: Request, tenant: Tenant,
                       body: Annotated[CountTokensRequest, JsonBody(CountTokensRequest)]) -> dict[str, int]:
    state = get_state(request)
    state.check_model(body.model, anthropic=True)
    prompt = await run_in_threadpool(build_prompt, state.tokenizer, body, state.max_prompt_chars,
                                     state.max_model_len, False)
    return {"input_tokens": len(prompt.token_ids)}
