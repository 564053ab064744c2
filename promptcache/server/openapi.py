"""What the published OpenAPI spec says each route answers: every status it can return, in the
dialect's error envelope, and every content type (JSON, server-sent events, Prometheus text).

FastAPI on its own lists a 422 that this server never returns (validation errors are 400s in the
dialect's envelope) and none of 400/401/404/408/413/429/503 — generated clients and fuzzers were
misled. ``fix_openapi`` removes the 422s; the ``*_RESPONSES`` tables are passed to the routes.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

_OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
_ANTHROPIC_ERROR = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {"type": {"const": "error"}, "error": {"type": "object", "required": ["type", "message"],
                                                           "properties": {"type": {"type": "string"},
                                                                          "message": {"type": "string"}}}},
}
_GEMINI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message", "status"], "properties": {
        "code": {"type": "integer"}, "message": {"type": "string"}, "status": {"type": "string"}}}},
}
_WHY = {405: "the path does not take this method (the Allow header lists those it takes)",
        400: "invalid request (bad field, too long for the context, too many breakpoints)",
        401: "missing or unknown API key", 404: "unknown model or route",
        408: "request body not received within --body-timeout-s", 413: "body over --max-request-bytes",
        429: "queue full (Retry-After header)", 503: "the engine failed (retry later)"}


def _errors(schema: dict[str, Any], statuses: tuple[int, ...]) -> dict[int | str, dict[str, Any]]:
    return {s: {"description": _WHY[s], "content": {"application/json": {"schema": schema}}} for s in statuses}


# each server-sent event: the dialect's event name (Anthropic) and its JSON (or "[DONE]") as data
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}
_GENERATION = (400, 401, 404, 408, 413, 429, 503)
_SSE: dict[int | str, dict[str, Any]] = {200: {
    "description": "the result; with stream=true a text/event-stream of the dialect's events",
    "content": {"application/json": {}, "text/event-stream": {"schema": _SSE_EVENT}},
}}

OPENAI_STREAMING: dict[int | str, dict[str, Any]] = {**_SSE, **_errors(_OPENAI_ERROR, _GENERATION)}
ANTHROPIC_STREAMING: dict[int | str, dict[str, Any]] = {**_SSE, **_errors(_ANTHROPIC_ERROR, _GENERATION)}
ANTHROPIC_COUNT: dict[int | str, dict[str, Any]] = _errors(_ANTHROPIC_ERROR, (400, 401, 404, 408, 413))
# /v1/models answers each dialect's client in its own envelope (anthropic-version, google-genai)
_ANY_ERROR = {"anyOf": [_OPENAI_ERROR, _ANTHROPIC_ERROR, _GEMINI_ERROR]}
MODELS: dict[int | str, dict[str, Any]] = _errors(_ANY_ERROR, (401,))
GEMINI_SSE: dict[int | str, dict[str, Any]] = {200: {
    "description": "the result; :streamGenerateContent?alt=sse answers text/event-stream (each data: a chunk)",
    "content": {"application/json": {}, "text/event-stream": {"schema": _SSE_EVENT}},
}}


def gemini_errors(statuses: tuple[int, ...]) -> dict[int | str, dict[str, Any]]:
    return _errors(_GEMINI_ERROR, statuses)


MODEL: dict[int | str, dict[str, Any]] = _errors(_ANY_ERROR, (401, 404))
METRICS: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text exposition format",
          "content": {"text/plain": {"schema": {"type": "string"}}}},
    401: {"description": "an operator key is needed (--admin-keys) on a server with API keys",
          "content": {"application/json": {"schema": _OPENAI_ERROR}}},
}
DASHBOARD_STATE: dict[int | str, dict[str, Any]] = {
    200: {"description": "totals, hit rate over time, recent requests, tenants, misses; with `engine` (KV blocks, "
                         "evictions, tiers) for operators",
          "content": {"application/json": {"schema": {
              "type": "object", "required": ["version", "totals", "series", "requests", "tenants", "misses", "scope"],
              "properties": {"version": {"type": "integer"}, "totals": {"type": "object"}, "series": {"type": "array"},
                             "requests": {"type": "array"}, "tenants": {"type": "object"}, "misses": {"type": "array"},
                             "scope": {"type": "string", "enum": ["all", "tenant"]}, "engine": {"type": "object"}}}}}},
    401: {"description": "a key is needed on a server with API keys (an operator key sees every tenant)",
          "content": {"application/json": {"schema": _OPENAI_ERROR}}},
}
DASHBOARD_EVENTS: dict[int | str, dict[str, Any]] = {
    200: {"description": "`event: state` with the JSON of /dashboard/api/state, on every change",
          "content": {"text/event-stream": {"schema": {"type": "string"}}}},
    401: DASHBOARD_STATE[401],
    429: {"description": "too many dashboard streams are open",
          "content": {"application/json": {"schema": _OPENAI_ERROR}}},
}
HEALTH: dict[int | str, dict[str, Any]] = {
    503: {"description": "the engine loop died or is not running",
          "content": {"application/json": {"schema": {"type": "object"}}}},
}


_REF = "#/components/schemas/{model}"
_BODIES: dict[str, type[BaseModel]] = {}


def json_request(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose body is ``body.JsonBody(model)``: FastAPI sees a dependency
    there, so the spec's request body (and the model's schemas, added by ``fix_openapi``) come from here."""
    _BODIES[model.__name__] = model
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": _REF.format(model=model.__name__)}}}}}


def _body_schemas() -> dict[str, Any]:
    keyed, defs = models_json_schema([(m, "validation") for m in _BODIES.values()], ref_template=_REF)
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    for (model, _), schema in keyed.items():
        if "$ref" not in schema:  # a model no other one refers to is inlined by pydantic
            schemas[model.__name__] = schema
    return schemas


def _served_limits(schemas: dict[str, Any], model_names: tuple[str, ...], vocab_size: int) -> None:
    """What only the running server knows: the model ids it serves (others are a 404) and the
    largest token id its vocabulary has (larger ones are a 400)."""
    for name, schema in schemas.items():
        if "model" in schema.get("properties", {}):
            gemini = name in ("CachedContentCreate", "GenerateContentRequest")  # "models/{id}" there
            names = [f"models/{m}" for m in model_names] if gemini else list(model_names)
            schema["properties"]["model"]["enum"] = names + ([None] if name == "GenerateContentRequest" else [])
    pending = [schemas.get("CompletionRequest", {}).get("properties", {}).get("prompt", {})]
    while pending:
        node = pending.pop()
        if node.get("type") == "integer":
            node["maximum"] = vocab_size - 1
        pending += [v for v in node.values() if isinstance(v, dict)]
        pending += [v for vs in node.values() if isinstance(vs, list) for v in vs if isinstance(v, dict)]


_SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "OpenAI clients: Authorization: Bearer KEY"},
    "x-api-key": {"type": "apiKey", "in": "header", "name": "x-api-key", "description": "Anthropic clients"},
    "x-goog-api-key": {"type": "apiKey", "in": "header", "name": "x-goog-api-key", "description": "Gemini clients"},
}
_OPEN_PATHS = ("/health",)  # liveness needs no key (its details do: an operator key)


def _security(spec: dict[str, Any]) -> None:
    """With API keys: every route needs one, either way of sending it; liveness stays open."""
    spec["components"]["securitySchemes"] = _SECURITY_SCHEMES
    spec["security"] = [{"bearer": []}, {"x-api-key": []}, {"x-goog-api-key": []}]
    for path in _OPEN_PATHS:
        for op in spec["paths"].get(path, {}).values():
            op["security"] = [{}, *spec["security"]]


def fix_openapi(app: FastAPI, model_names: tuple[str, ...], vocab_size: int, keyed: bool) -> None:
    """Add the request bodies' schemas with the served limits (and, on a server with API keys, its
    security schemes); drop FastAPI's 422 responses and its unused validation-error schemas."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = FastAPI.openapi(app)
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(_body_schemas())
            _served_limits(schemas, model_names, vocab_size)
            for path, ops in spec.get("paths", {}).items():  # a model path parameter: others are a 404
                if path.startswith(("/v1/models/{", "/v1beta/models/{")):
                    for op in ops.values():
                        for param in op.get("parameters", []):
                            if param.get("in") == "path" and param.get("name") in ("model_id", "model"):
                                param["schema"]["enum"] = list(model_names)
            if keyed:
                _security(spec)
            for ops in spec.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            schemas = spec.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
