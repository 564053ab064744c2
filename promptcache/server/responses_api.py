"""OpenAI's Responses API: ``/v1/responses`` create, retrieve, delete, and ``/input_items``.

Conversation state lives on the server: a response created with ``store`` (the default) can be
continued with ``previous_response_id`` — the new prompt is that response's conversation (its
input and output, without its ``instructions``) followed by the new input, so everything up to
the previous turn is a cache hit. Stored responses are per tenant and bounded
(server/response_store.py); ``store: false`` keeps nothing. Caching fields are the chat API's
(``prompt_cache_retention``, ``prompt_cache_options``, ``prompt_cache_key``); usage reports
``input_tokens_details.cached_tokens`` and ``cache_write_tokens``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from promptcache.engine.api import RequestOutput, RequestSpec, Retention, StructuredOutput
from promptcache.server import misses, openapi
from promptcache.server import responses_format as rfmt
from promptcache.server.body import JsonBody
from promptcache.server.diagnosis import SYSTEM, Part, conversation_parts, openai_diagnostics
from promptcache.server.errors import ApiError
from promptcache.server.generation import EventStream, Generation
from promptcache.server.openai_api import plan_tools, retention_ttl
from promptcache.server.prompt import TemplateMessage, build_chat_prompt, part_text
from promptcache.server.response_store import StoredResponse, conversation_chars
from promptcache.server.schemas_responses import InputItem, InputText, ResponseCreateRequest
from promptcache.server.state import ServerState, get_state, new_id, sampling_params, tenant_of
from promptcache.server.tools import Tool, ToolCall, ToolPlan

router = APIRouter(tags=["OpenAI"])
# the spec links a created response's id to the routes that take it (clients and fuzzers follow them)
_ID = {"response_id": "$response.body#/id"}
CREATED = {**openapi.OPENAI_STREAMING, 200: {**openapi.OPENAI_STREAMING[200], "links": {
    "RetrieveResponse": {"operationId": "retrieve_response", "parameters": _ID},
    "DeleteResponse": {"operationId": "delete_response", "parameters": _ID},
    "ListInputItems": {"operationId": "list_input_items", "parameters": _ID}}}}
Tenant = Annotated[str | None, Depends(tenant_of)]


def _text(content: str | list[InputText] | None, where: str) -> tuple[str, ...]:
    if content is None or isinstance(content, str):
        return (content or "",)
    return tuple(part_text("input_text" if p.type in ("output_text", "text") else p.type, p.text, f"{where}[{j}]")
                 for j, p in enumerate(content))


def input_messages(items: str | list[InputItem]) -> list[TemplateMessage]:
    """``input`` as chat-template messages: function calls join the assistant turn they belong to,
    their outputs are ``tool`` messages."""
    if isinstance(items, str):
        return [TemplateMessage("user", (items,))]
    out: list[TemplateMessage] = []
    for i, it in enumerate(items):
        where = f"input[{i}]"
        kind = it.type or "message"
        if kind == "message":
            if it.role is None:
                raise ApiError(400, f"{where}.role: a message item needs role", param=f"{where}.role")
            role = "system" if it.role == "developer" else it.role
            out.append(TemplateMessage(role, _text(it.content, f"{where}.content")))
        elif kind == "function_call":
            for name in ("call_id", "name", "arguments"):
                if getattr(it, name) is None:
                    raise ApiError(400, f"{where}.{name}: a function_call item needs {name}", param=f"{where}.{name}")
            call = {"id": it.call_id, "type": "function", "function": {"name": it.name, "arguments": it.arguments}}
            last = out[-1] if out else None
            if last is not None and last.role == "assistant" and "tool_calls" in last.extra:
                last.extra["tool_calls"].append(call)
            else:
                out.append(TemplateMessage("assistant", ("",), {"tool_calls": [call]}))
        else:  # function_call_output
            if it.call_id is None or it.output is None:
                missing = "call_id" if it.call_id is None else "output"
                raise ApiError(400, f"{where}.{missing}: a function_call_output item needs {missing}",
                               param=f"{where}.{missing}")
            text = "\n".join(_text(it.output, f"{where}.output"))
            out.append(TemplateMessage("tool", (text,), {"tool_call_id": it.call_id}))
    return out


def output_message(text: str, calls: list[ToolCall]) -> TemplateMessage:
    """A response's output as the assistant turn of the conversation that follows it."""
    extra: dict[str, Any] = {}
    if calls:
        extra["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}} for c in calls]
    return TemplateMessage("assistant", (text,), extra)


def _refuse_unsupported(body: ResponseCreateRequest) -> None:
    if body.reasoning is not None and body.reasoning.effort not in (None, "none"):
        raise ApiError(400, "reasoning.effort is not supported by this server (the model does not reason)",
                       param="reasoning.effort")
    if body.background:
        raise ApiError(400, "background is not supported by this server", param="background")
    if body.top_logprobs:
        raise ApiError(400, "top_logprobs is not supported on /v1/responses by this server (use "
                            "/v1/chat/completions)", param="top_logprobs")
    if body.truncation == "auto":
        raise ApiError(400, "truncation 'auto' is not supported by this server: a prompt longer than the "
                            "context is a 400", param="truncation")
    for k, t in enumerate(body.tools or []):
        if t.type != "function":
            raise ApiError(400, f"tools[{k}].type: {t.type!r} tools are not supported by this server (function "
                                "tools only)", param=f"tools[{k}].type")
        if t.name is None:
            raise ApiError(400, f"tools[{k}].name: Field required", param=f"tools[{k}].name")


def _structured(body: ResponseCreateRequest) -> StructuredOutput | None:
    f = body.text.format if body.text is not None else None
    if f is None or f.type == "text":
        return None
    if f.type == "json_object":
        return StructuredOutput("json_object")
    if f.schema_ is None:
        raise ApiError(400, "text.format.schema is required when type is 'json_schema'", param="text.format.schema")
    return StructuredOutput.json_schema(f.schema_)


def _plan(state: ServerState, body: ResponseCreateRequest) -> tuple[ToolPlan | None, StructuredOutput | None]:
    tools = [Tool(t.name or "", t.parameters or {"type": "object"}) for t in body.tools or []]
    choice = body.tool_choice
    formatted = body.text is not None and body.text.format is not None and body.text.format.type != "text"
    if choice is None or isinstance(choice, str):
        return plan_tools(state, tools, choice, None, formatted, "text.format")
    return plan_tools(state, tools, "named", choice.name, formatted, "text.format")


def _tool_dicts(body: ResponseCreateRequest) -> list[dict[str, Any]] | None:
    if not body.tools:
        return None
    return [{"type": "function", "function": {k: v for k, v in (("name", t.name), ("description", t.description),
                                                                 ("parameters", t.parameters)) if v is not None}}
            for t in body.tools]


def _conversation(state: ServerState, tenant: str | None, body: ResponseCreateRequest) -> list[TemplateMessage]:
    before: tuple[TemplateMessage, ...] = ()
    if body.previous_response_id is not None:
        prev = state.responses.get(tenant, body.previous_response_id)
        if prev is None:
            raise ApiError(404, f"Previous response with id '{body.previous_response_id}' not found.",
                           param="previous_response_id", code="previous_response_not_found")
        before = prev.conversation
    return [*before, *input_messages(body.input)]


def _build(state: ServerState, body: ResponseCreateRequest,
           conversation: list[TemplateMessage]) -> list[int]:
    messages = ([TemplateMessage("system", (body.instructions,))] if body.instructions else []) + conversation
    try:
        prompt = build_chat_prompt(state.tokenizer, messages, _tool_dicts(body), (), state.max_prompt_chars,
                                   state.max_model_len)
    except ValueError as e:
        raise ApiError(400, str(e), param="input") from None
    return prompt.token_ids


def _parts(body: ResponseCreateRequest, conversation: list[TemplateMessage]) -> list[Part]:
    head = [Part("instructions", SYSTEM, body.instructions)] if body.instructions else []
    return conversation_parts(_tool_dicts(body), conversation, "conversation", head)


def _echo(body: ResponseCreateRequest) -> dict[str, Any]:
    """The request's settings, as the response object repeats them."""
    fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format else {
        "type": "text"}
    choice = body.tool_choice.model_dump() if body.tool_choice is not None and not isinstance(
        body.tool_choice, str) else (body.tool_choice or "auto")
    return {"instructions": body.instructions, "metadata": body.metadata or {}, "parallel_tool_calls":
            body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
            "temperature": body.temperature if body.temperature is not None else 1.0,
            "top_p": body.top_p if body.top_p is not None else 1.0, "tool_choice": choice,
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "max_output_tokens": body.max_output_tokens, "previous_response_id": body.previous_response_id,
            "prompt_cache_key": body.prompt_cache_key, "prompt_cache_retention": body.prompt_cache_retention,
            "store": body.store is not False, "text": {"format": fmt}, "truncation": "disabled",
            "user": body.user, "reasoning": {"effort": None, "summary": None}, "service_tier": "default"}


@router.post("/v1/responses", summary="Create a response (OpenAI Responses API), streamed with stream=true",
             response_model=None, responses=CREATED, operation_id="create_response",
             openapi_extra=openapi.json_request(ResponseCreateRequest))
async def create_response(request: Request, tenant: Tenant,
                          body: Annotated[ResponseCreateRequest, JsonBody(ResponseCreateRequest)]) -> Response:
    state = get_state(request)
    model = state.check_model(body.model, anthropic=False)
    _refuse_unsupported(body)
    plan, forced = _plan(state, body)
    structured = forced or _structured(body)
    conversation = _conversation(state, tenant, body)
    prompt_ids = await run_in_threadpool(_build, state, body, conversation)
    opts = body.prompt_cache_options
    max_tokens = 0 if opts is not None and opts.prewarm else body.max_output_tokens
    if max_tokens is None:
        max_tokens = state.default_max_tokens(len(prompt_ids))
    params = sampling_params(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                             seed=body.seed, ignore_eos=body.ignore_eos, structured=structured)
    rid = new_id("resp_")
    endpoint = "/v1/responses"
    spec = RequestSpec(rid, prompt_ids, params, tenant, Retention(retention_ttl(opts, body.prompt_cache_retention)),
                       cache_key=body.prompt_cache_key)
    gen = await Generation.start(state, request, endpoint, spec)
    try:
        named = opts.comparison_response_id if opts is not None else None
        extra = await misses.response_fields(state, request, tenant, rid, lambda: _parts(body, conversation),
                                             prompt_ids, gen.first, named, "prompt_cache_diagnostics",
                                             openai_diagnostics)
        gen.on_finish(misses.on_finish(state, tenant, endpoint, gen.ttft_s))
    except BaseException:
        await gen.close()
        raise
    shell = rfmt.ResponseShell(rid, model, _echo(body))
    inputs = tuple(i.model_dump(exclude_none=True) for i in body.input) if not isinstance(body.input, str) else (
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": body.input}]},)

    def store(response: dict[str, Any], text: str, calls: list[ToolCall], out: RequestOutput | None = None) -> None:
        if out is not None:
            response.update(misses.cost_field(state, out))
        if body.store is False:
            return
        convo = (*conversation, output_message(text, calls))
        state.responses.put(tenant, rid, StoredResponse(response, inputs, convo, conversation_chars(convo)))

    if body.stream:
        return EventStream(rfmt.stream(gen, shell, plan, extra, store))
    out = await gen.final(request)
    response, text, calls = rfmt.response_json(shell, out, plan, extra)
    store(response, text, calls, out)
    return JSONResponse(response)


def _stored(state: ServerState, tenant: str | None, response_id: str) -> StoredResponse:
    stored = state.responses.get(tenant, response_id)
    if stored is None:
        raise ApiError(404, f"Response with id '{response_id}' not found.", param="response_id")
    return stored


@router.get("/v1/responses/{response_id}", summary="Retrieve a stored response (OpenAI Responses API)",
            responses=openapi.MODEL, operation_id="retrieve_response")
async def retrieve_response(response_id: str, request: Request, tenant: Tenant) -> dict[str, Any]:
    return _stored(get_state(request), tenant, response_id).response


@router.delete("/v1/responses/{response_id}", summary="Delete a stored response (OpenAI Responses API)",
               responses=openapi.MODEL, operation_id="delete_response")
async def delete_response(response_id: str, request: Request, tenant: Tenant) -> dict[str, Any]:
    state = get_state(request)
    _stored(state, tenant, response_id)
    state.responses.delete(tenant, response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items", summary="The input items of a stored response",
            responses=openapi.MODEL, operation_id="list_input_items")
async def input_items(response_id: str, request: Request, tenant: Tenant) -> dict[str, Any]:
    stored = _stored(get_state(request), tenant, response_id)
    data = [{"id": item.get("id") or f"item_{response_id[5:]}_{k}", **item} for k, item in
            enumerate(reversed(stored.input_items))]  # newest first, OpenAI's default order
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": False}
