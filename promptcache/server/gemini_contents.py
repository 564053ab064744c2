"""Gemini's request parts as the rest of the server speaks: contents -> chat-template messages,
function declarations and Gemini's OpenAPI-subset schemas -> tools and JSON Schema, toolConfig and
generationConfig -> the tool plan and structured output (shared by generateContent, countTokens
and cachedContents)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter

from promptcache.engine.api import StructuredOutput
from promptcache.server import openapi
from promptcache.server.errors import ApiError
from promptcache.server.openai_api import plan_tools
from promptcache.server.prompt import TemplateMessage
from promptcache.server.schemas_gemini import Content, GenerateContentRequest, SystemContent, ToolConfig
from promptcache.server.schemas_gemini import GeminiTool as GTool
from promptcache.server.state import ServerState
from promptcache.server.tools import Tool, ToolPlan

PREFIXES = ("/v1beta", "/v1")  # google-genai pointed at a base URL calls /v1


def add_routes(router: APIRouter, routes: list[tuple[str, Any, str, str, dict[int | str, dict[str, Any]], Any]]
               ) -> None:
    """Each ``(path, handler, method, summary, responses, body model)`` under both prefixes."""
    for prefix in PREFIXES:
        for path, handler, method, summary, responses, body in routes:
            router.add_api_route(prefix + path, handler, methods=[method], summary=summary, responses=responses,
                                 response_model=None, operation_id=f"{handler.__name__}{prefix.replace('/', '_')}",
                                 openapi_extra=openapi.json_request(body) if body is not None else None)


def messages_of(contents: list[Content], system: SystemContent | None,
                where: str = "contents") -> list[TemplateMessage]:
    out: list[TemplateMessage] = []
    if system is not None:
        out.append(TemplateMessage("system", tuple(texts_of(system, "systemInstruction"))))
    pending: dict[str, list[str]] = {}  # function name -> ids of its calls not yet answered
    calls_made = 0
    for i, content in enumerate(contents):
        role = "assistant" if content.role == "model" else "user"
        texts, calls, results = [], [], []
        for j, part in enumerate(content.parts):
            at = f"{where}[{i}].parts[{j}]"
            check_part(part, at)
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


def check_part(part: Any, at: str) -> None:
    extra = sorted((part.model_extra or {}).keys())
    if extra:
        raise ApiError(400, f"{at}: {extra[0]} parts are not supported by this server (text, functionCall and "
                            "functionResponse only)")
    kinds = [k for k in ("text", "functionCall", "functionResponse") if getattr(part, k) is not None]
    if len(kinds) != 1:
        raise ApiError(400, f"{at}: a part holds exactly one of text, functionCall, functionResponse")


def texts_of(content: SystemContent, where: str) -> list[str]:
    out = []
    for j, part in enumerate(content.parts):
        extra = sorted((part.model_extra or {}).keys())
        if part.text is None or extra:
            raise ApiError(400, f"{where}.parts[{j}]: the system instruction is text only")
        out.append(part.text)
    return out


def tools_of(tools: list[GTool] | None) -> tuple[list[dict[str, Any]] | None, list[Tool]]:
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


def plan_for(state: ServerState, tools: list[Tool], config: ToolConfig | None,
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


def structured_of(body: GenerateContentRequest) -> StructuredOutput | None:
    g = body.generationConfig
    if g is None:
        return None
    schema = g.responseJsonSchema or (openapi_to_json_schema(g.responseSchema) if g.responseSchema else None)
    if g.responseMimeType != "application/json":
        if schema is not None:
            raise ApiError(400, "generationConfig.responseSchema needs responseMimeType 'application/json'")
        return None
    return StructuredOutput.json_schema(schema) if schema is not None else StructuredOutput("json_object")


def refuse_unsupported(body: GenerateContentRequest) -> None:
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
