"""The OpenAI dialect: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

Caching is automatic; ``usage.prompt_tokens_details.cached_tokens`` is the exact number of prompt
tokens whose K/V were reused (whole blocks). Retention (how long blocks stay pinned after use):

- ``prompt_cache_options.ttl`` if sent, else ``prompt_cache_retention`` (``in_memory`` 10 min,
  ``24h``), else ``OPT_IN_TTL_S`` when the request opts in (``prompt_cache_options`` or a
  breakpoint), else none: blocks stay cached only as long as LRU eviction allows.
- mode ``implicit`` (default) applies that ttl to the whole prompt; mode ``explicit`` only to the
  prompt up to the last content part carrying ``prompt_cache_breakpoint``.
- ``prompt_cache_options.prewarm`` stores the prompt and generates nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from promptcache.engine.api import RequestOutput, RequestSpec, Retention, SamplingParams, StructuredOutput
from promptcache.server import choices, misses, openapi
from promptcache.server import openai_format as fmt
from promptcache.server.body import JsonBody
from promptcache.server.diagnosis import MESSAGES, SYSTEM, TOOLS, Part, openai_diagnostics
from promptcache.server.errors import ApiError, is_anthropic, is_gemini
from promptcache.server.gemini_models import list_models_json, model_json, served_model
from promptcache.server.generation import EventStream, Generation
from promptcache.server.openai_format import ToolPlan
from promptcache.server.prompt import (
    MAX_BREAKPOINTS,
    Cut,
    TemplateMessage,
    build_chat_prompt,
    check_prompt_chars,
    part_text,
)
from promptcache.server.retention import RETENTION_NAMES
from promptcache.server.schemas_openai import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequestBase,
    PromptCacheOptions,
)
from promptcache.server.state import ServerState, get_state, new_id, sampling_params, tenant_of, ttl_seconds
from promptcache.server.tools import Tool, detect

router = APIRouter(tags=["OpenAI"])
Tenant = Annotated[str | None, Depends(tenant_of)]
# Our choice (OpenAI documents no default): a request that opts in without a ttl keeps its prompt
# 30 minutes, between the 5-10 min of "in_memory" and the 24 h of extended retention.
OPT_IN_TTL_S = 1800.0


@router.get("/v1/models", summary="List the served model (OpenAI, or Anthropic with anthropic-version)",
            responses=openapi.MODELS)
async def list_models(request: Request, tenant: Tenant) -> dict[str, Any]:
    state = get_state(request)
    if is_gemini(request):  # google-genai pointed at this server lists /v1/models
        return list_models_json(state)
    if is_anthropic(request):
        data = [{"type": "model", "id": m, "display_name": m, "created_at": "1970-01-01T00:00:00Z"}
                for m in state.model_names]
        return {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
    return {"object": "list", "data": [{"id": m, "object": "model", "created": state.created,
                                        "owned_by": "promptcache"} for m in state.model_names]}


@router.get("/v1/models/{model_id:path}", summary="Retrieve the served model (OpenAI, or Anthropic with "
            "anthropic-version)", responses=openapi.MODEL)
async def retrieve_model(model_id: str, request: Request, tenant: Tenant) -> dict[str, Any]:
    state = get_state(request)
    if is_gemini(request):
        return model_json(state, served_model(state, model_id, "get"))
    anthropic = is_anthropic(request)
    state.check_model(model_id, anthropic=anthropic)  # 404 in the dialect's words
    if anthropic:
        return {"type": "model", "id": model_id, "display_name": model_id, "created_at": "1970-01-01T00:00:00Z"}
    return {"id": model_id, "object": "model", "created": state.created, "owned_by": "promptcache"}


MAX_CHOICES = 8  # n: each choice is a request of its own (sharing the prompt's blocks)


def _refuse_unsupported(req: OpenAIRequestBase) -> None:
    n = req.n or 1
    if n > MAX_CHOICES:
        raise ApiError(400, f"n must be at most {MAX_CHOICES}", param="n")
    if n > 1 and req.stream and isinstance(req, CompletionRequest):
        raise ApiError(400, "n > 1 is not supported with stream=true on /v1/completions by this server (send n "
                            "requests, or stream=false)", param="n")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name):
            raise ApiError(400, f"{name} is not supported (only 0)", param=name)


def _template_messages(req: ChatCompletionRequest) -> tuple[list[TemplateMessage], list[Cut]]:
    messages, cuts = [], []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role  # chat templates know "system"
        if m.content is None or isinstance(m.content, str):
            parts: tuple[str, ...] = (m.content or "",)
        else:
            parts = tuple(part_text(part.type, part.text, f"messages[{i}].content[{j}]")
                          for j, part in enumerate(m.content))
            cuts += [Cut(i, j) for j, part in enumerate(m.content) if part.prompt_cache_breakpoint is not None]
        extra = {k: v for k in ("name", "tool_calls", "tool_call_id") if (v := getattr(m, k)) is not None}
        messages.append(TemplateMessage(role, parts, extra))
    return messages, cuts


def _ttl(req: OpenAIRequestBase, has_breakpoints: bool) -> float:
    return retention_ttl(req.prompt_cache_options, req.prompt_cache_retention, has_breakpoints)


def retention_ttl(opts: PromptCacheOptions | None, retention: str | None, has_breakpoints: bool = False) -> float:
    """Seconds every block of the prompt is kept after its last use (the module docstring's rule;
    the Responses API shares it)."""
    if opts is not None and opts.ttl is not None:
        return ttl_seconds(opts.ttl, "prompt_cache_options.ttl")
    if retention is not None:
        return RETENTION_NAMES[retention]
    return OPT_IN_TTL_S if (opts is not None or has_breakpoints) else 0.0


def _explicit(req: OpenAIRequestBase) -> bool:
    return req.prompt_cache_options is not None and req.prompt_cache_options.mode == "explicit"


def tool_plan(state: ServerState, req: ChatCompletionRequest) -> tuple[ToolPlan | None, StructuredOutput | None]:
    """The request's tools, and the grammar that forces a call (``tool_choice`` required or named)."""
    tools = [Tool(t.function.name, t.function.parameters or {"type": "object"}) for t in req.tools or []]
    choice = req.tool_choice
    named = choice.function.name if choice is not None and not isinstance(choice, str) else None
    formatted = req.response_format is not None and req.response_format.type != "text"
    return plan_tools(state, tools, choice if isinstance(choice, str) or choice is None else "named", named,
                      formatted, "response_format")


def plan_tools(state: ServerState, tools: list[Tool], choice: str | None, named: str | None, formatted: bool,
               format_field: str) -> tuple[ToolPlan | None, StructuredOutput | None]:
    """Tools and ``tool_choice`` (``none`` | ``auto`` | ``required`` | ``named``) -> the plan, and
    the grammar that forces a call; ``formatted``: structured output was asked for too."""
    if not tools:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        return None, None
    choice = choice or "auto"
    plan = ToolPlan(tools, detect(state.tokenizer.chat_template), parse=choice != "none")
    if choice in ("none", "auto"):
        return plan, None
    if formatted:
        raise ApiError(400, f"a forced tool call and {format_field} cannot be combined", param="tool_choice")
    name = None if choice == "required" else named
    forced = plan.force(name)
    if forced is None:
        raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return plan, forced


def _params(state: ServerState, req: OpenAIRequestBase, max_tokens: int | None, num_prompt_tokens: int,
            logprobs: int | None, forced: StructuredOutput | None = None) -> SamplingParams:
    if req.prompt_cache_options is not None and req.prompt_cache_options.prewarm:
        max_tokens = 0
    if max_tokens is None:
        max_tokens = state.default_max_tokens(num_prompt_tokens)
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    return sampling_params(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                           top_k=req.top_k, seed=req.seed, stop=stop, ignore_eos=req.ignore_eos,
                           logprobs=logprobs, logit_bias=_logit_bias(req), structured=forced or _structured(req))


def _logit_bias(req: OpenAIRequestBase) -> dict[int, float] | None:
    if not req.logit_bias:
        return None
    out = {}
    for key, value in req.logit_bias.items():
        if not (key.isascii() and key.isdigit()):  # int() would take "²" or " 5"; token ids are ASCII digits
            raise ApiError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias")
        out[int(key)] = float(value)
    return out


def _structured(req: OpenAIRequestBase) -> StructuredOutput | None:
    fmt_ = req.response_format
    if fmt_ is None or fmt_.type == "text":
        return None
    if fmt_.type == "json_object":
        return StructuredOutput("json_object")
    if fmt_.json_schema is None:
        raise ApiError(400, "response_format.json_schema is required when type is 'json_schema'",
                       param="response_format.json_schema")
    return StructuredOutput.json_schema(fmt_.json_schema.schema_)


def _build_chat(state: ServerState, req: ChatCompletionRequest) -> tuple[list[int], Retention]:
    messages, cuts = _template_messages(req)
    if len(cuts) > MAX_BREAKPOINTS:  # refused before any rendering, in either mode
        raise ApiError(400, f"At most {MAX_BREAKPOINTS} content parts may carry prompt_cache_breakpoint; "
                            f"found {len(cuts)}.", param="messages")
    ttl = _ttl(req, bool(cuts))
    explicit = _explicit(req)
    try:
        prompt = build_chat_prompt(state.tokenizer, messages, tool_dicts(req), cuts if explicit else (),
                                   state.max_prompt_chars, state.max_model_len)
    except ValueError as e:
        raise ApiError(400, str(e), param="messages") from None
    if explicit:
        return prompt.token_ids, Retention(0.0, tuple((end, ttl) for end in prompt.cut_tokens))
    return prompt.token_ids, Retention(ttl)


@router.post("/v1/chat/completions", summary="Chat completion (OpenAI), streamed with stream=true",
             response_model=None, responses=openapi.OPENAI_STREAMING,
             openapi_extra=openapi.json_request(ChatCompletionRequest))
async def chat_completions(request: Request, tenant: Tenant,
                           body: Annotated[ChatCompletionRequest, JsonBody(ChatCompletionRequest)]) -> Response:
    state = get_state(request)
    model = state.check_model(body.model, anthropic=False)
    _refuse_unsupported(body)
    plan, forced = tool_plan(state, body)
    prompt_ids, retention = await run_in_threadpool(_build_chat, state, body)
    want_logprobs = bool(body.logprobs) or body.top_logprobs is not None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = _params(state, body, max_tokens, len(prompt_ids),
                     (body.top_logprobs or 0) if want_logprobs else None, forced)
    rid = new_id("chatcmpl-")
    endpoint = "/v1/chat/completions"
    spec = RequestSpec(rid, prompt_ids, params, tenant, retention, cache_key=body.prompt_cache_key)
    gens = await choices.start(state, request, endpoint, spec, body.n or 1)
    gen = gens[0]
    try:
        extra = await _diagnostics(state, request, tenant, rid, lambda: chat_parts(body), prompt_ids, gen, body)
        gen.on_finish(misses.on_finish(state, tenant, endpoint, gen.ttft_s))
    except BaseException:
        await choices.close(gens)
        raise
    ids = _wants_ids(body)
    extra = {**extra, "prompt_token_ids": list(prompt_ids)} if ids else extra  # as vLLM returns them
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return EventStream(fmt.chat_stream(gens, state.tokenizer, rid, model, include_usage, want_logprobs, extra,
                                           lambda out: misses.cost_field(state, out), plan, ids))
    return await _plain(request, state, gens, extra, ids,
                        lambda o: fmt.chat_response(rid, model, o, state.tokenizer, want_logprobs, plan))


def _wants_ids(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(body.return_token_ids or body.return_tokens)


async def _plain(request: Request, state: ServerState, gens: list[Generation], extra: dict[str, Any], ids: bool,
                 render: Callable[[RequestOutput], dict[str, Any]]) -> JSONResponse:
    """A non-streamed response: usage summed over the choices, each choice rendered with its index
    (and its generated ``token_ids`` when asked), the extension fields, the cost."""
    outs = await choices.finals(request, gens)
    total = choices.summed(outs)
    response = render(total)
    response["choices"] = [{**render(o)["choices"][0], "index": i, **({"token_ids": list(o.token_ids)} if ids else {})}
                           for i, o in enumerate(outs)]
    return JSONResponse({**response, **extra, **misses.cost_field(state, total)})


def tool_dicts(req: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools as the chat template gets them (fields in their declared order, none left empty)."""
    return [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None


def chat_parts(req: ChatCompletionRequest) -> list[Part]:
    """The prompt as a diagnosis names it: tools, then each message's role and content parts."""
    parts = [Part(f"tools[{k}]", TOOLS, json.dumps(t, ensure_ascii=False)) for k, t in enumerate(tool_dicts(req) or [])]
    messages, _ = _template_messages(req)
    for i, (m, tm) in enumerate(zip(req.messages, messages, strict=True)):
        kind = SYSTEM if tm.role == "system" else MESSAGES
        parts.append(Part(f"messages[{i}].role", kind, m.role))
        if m.content is None or isinstance(m.content, str):
            parts.append(Part(f"messages[{i}].content", kind, tm.parts[0]))
        else:
            parts += [Part(f"messages[{i}].content[{j}]", kind, text) for j, text in enumerate(tm.parts)]
        for key, value in tm.extra.items():
            parts.append(Part(f"messages[{i}].{key}", kind, json.dumps(value, ensure_ascii=False)))
    return parts


async def _diagnostics(state: ServerState, request: Request, tenant: str | None, rid: str,
                       parts: Callable[[], list[Part]], prompt_ids: list[int], gen: Generation,
                       body: OpenAIRequestBase) -> dict[str, Any]:
    named = body.prompt_cache_options.comparison_response_id if body.prompt_cache_options is not None else None
    return await misses.response_fields(state, request, tenant, rid, parts, prompt_ids, gen.first, named,
                                        "prompt_cache_diagnostics", openai_diagnostics)


def _completion_prompt(state: ServerState, req: CompletionRequest) -> list[int]:
    prompt: Any = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise ApiError(400, "batched prompts are not supported: send one prompt per request",
                           param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        try:
            check_prompt_chars(len(prompt), state.max_prompt_chars)
        except ValueError as e:
            raise ApiError(400, str(e), param="prompt") from None
        return state.tokenizer.encode(prompt)
    return [int(t) for t in prompt]


@router.post("/v1/completions", summary="Text completion (OpenAI legacy), streamed with stream=true",
             response_model=None, responses=openapi.OPENAI_STREAMING,
             openapi_extra=openapi.json_request(CompletionRequest))
async def completions(request: Request, tenant: Tenant,
                      body: Annotated[CompletionRequest, JsonBody(CompletionRequest)]) -> Response:
    state = get_state(request)
    model = state.check_model(body.model, anthropic=False)
    _refuse_unsupported(body)
    if body.echo:
        raise ApiError(400, "echo is not supported", param="echo")
    if body.suffix:
        raise ApiError(400, "suffix is not supported", param="suffix")
    if body.best_of not in (None, 1):
        raise ApiError(400, "best_of must be 1", param="best_of")
    prompt_ids = await run_in_threadpool(_completion_prompt, state, body)
    params = _params(state, body, body.max_tokens, len(prompt_ids), body.logprobs)
    retention = Retention(_ttl(body, False))
    rid = new_id("cmpl-")
    endpoint = "/v1/completions"
    spec = RequestSpec(rid, prompt_ids, params, tenant, retention, cache_key=body.prompt_cache_key)
    gens = await choices.start(state, request, endpoint, spec, body.n or 1)
    gen = gens[0]
    text = body.prompt if isinstance(body.prompt, str) else json.dumps(body.prompt)
    try:
        extra = await _diagnostics(state, request, tenant, rid, lambda: [Part("prompt", MESSAGES, text)],
                                   prompt_ids, gen, body)
        gen.on_finish(misses.on_finish(state, tenant, endpoint, gen.ttft_s))
    except BaseException:
        await choices.close(gens)
        raise
    want_logprobs = body.logprobs is not None
    ids = _wants_ids(body)
    extra = {**extra, "prompt_token_ids": list(prompt_ids)} if ids else extra
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return EventStream(fmt.completion_stream(gen, state.tokenizer, rid, model, include_usage, want_logprobs,
                                                 extra, lambda out: misses.cost_field(state, out), ids))
    return await _plain(request, state, gens, extra, ids,
                        lambda o: fmt.completion_response(rid, model, o, state.tokenizer, want_logprobs))
