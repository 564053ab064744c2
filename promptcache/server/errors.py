"""Errors in each dialect's envelope: OpenAI ``{"error": {...}}``, Anthropic ``{"type": "error", ...}``.

Every failure the server can foresee is an ``ApiError``; the handlers below also turn FastAPI's
validation errors (422) into 400s and unknown routes into 404s, in the caller's dialect, so a
client never sees a bare 500 or a FastAPI-shaped body. Error bodies are rendered with
``ensure_ascii=True``: whatever text an error quotes, rendering it cannot fail.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

# OpenAI error "type" for a status; Anthropic's differ (see _ANTHROPIC_TYPES).
_OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                 405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
                 429: "requests",
                 503: "server_error"}
# 503 is an internal failure (the engine died): "api_error". Anthropic's "overloaded_error" means real
# overload (529), which this server reports as 429 (queue full) instead.
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
                    413: "request_too_large",
                    429: "rate_limit_error", 503: "api_error", 529: "overloaded_error"}
ENGINE_FAILED = "the model engine failed while serving this request; please retry later"
# the providers' other APIs: a client that calls one is told it is not served here, not "Invalid URL"
NOT_SERVED = ("/v1/embeddings", "/v1/audio", "/v1/images", "/v1/files", "/v1/uploads", "/v1/batches",
              "/v1/moderations", "/v1/fine_tuning", "/v1/assistants", "/v1/threads", "/v1/vector_stores",
              "/v1/realtime", "/v1/conversations", "/v1/messages/batches", "/v1/complete",
              "/v1beta/files", "/v1beta/tunedModels", "/v1/skills", "/v1/organizations")


class ApiError(Exception):
    """A failure the client should see as ``status`` with ``message`` in its dialect's envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


GEMINI_PATHS = ("/v1beta/", "/v1/cachedContents")
# Google's canonical status names, by HTTP status (google.rpc.Code)
_GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                  405: "INVALID_ARGUMENT", 408: "DEADLINE_EXCEEDED", 409: "ALREADY_EXISTS", 413: "INVALID_ARGUMENT",
                  429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED",
                  503: "UNAVAILABLE"}
GOOGLE_STATUSES = frozenset({*_GOOGLE_STATUS.values(), "FAILED_PRECONDITION", "OUT_OF_RANGE"})


def is_gemini(request: Request) -> bool:
    """Which envelope to answer in: Gemini's routes, or any request from a google-genai client
    (which also calls ``/v1/models`` when pointed at this server)."""
    path = request.url.path
    if path.startswith(GEMINI_PATHS) or (path.startswith("/v1/models/") and request.method == "POST"):
        return True  # Gemini's routes (POST /v1/models/{model}:method)
    shared = path == "/v1/models" or path.startswith("/v1/models/") or path.startswith(NOT_SERVED)
    return shared and ("x-goog-api-client" in request.headers or "x-goog-api-key" in request.headers)


def gemini_error_body(status: int, message: str, status_name: str | None = None) -> dict[str, Any]:
    name = status_name if status_name in GOOGLE_STATUSES else _GOOGLE_STATUS.get(
        status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")
    return {"error": {"code": status, "message": message, "status": name}}


def is_anthropic(request: Request) -> bool:
    """Which envelope to answer in: the Messages routes, or any request from an Anthropic client."""
    return request.url.path.startswith("/v1/messages") or "anthropic-version" in request.headers


def openai_error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    err_type = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    err_type = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": err_type, "message": message}}


def error_json(body: dict[str, Any]) -> str:
    """An error body as JSON that always renders (lone surrogates in quoted input become escapes)."""
    return json.dumps(body, ensure_ascii=True, separators=(",", ":"))


class ErrorResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return error_json(content).encode("ascii")


def error_body(request: Request, err: ApiError) -> dict[str, Any]:
    if is_gemini(request):
        return gemini_error_body(err.status, err.message, err.code)
    if is_anthropic(request):
        return anthropic_error_body(err.status, err.message)
    return openai_error_body(err.status, err.message, err.param, err.code)


def error_response(request: Request, err: ApiError) -> JSONResponse:
    return ErrorResponse(error_body(request, err), status_code=err.status, headers=err.headers)


# ---- validation errors (FastAPI's 422) -> 400 ---------------------------------------------------

_TYPE_TAG = re.compile(r"^[A-Z]\w*$|[\[\]'(]|^(str|int|float|bool|list|dict|none|literal|json-or-python)$"
                       r"|^constrained-\w+$")


def _field_path(loc: Sequence[int | str], anthropic: bool) -> str:
    """``("body", "messages", 0, "str", "content")`` -> ``messages.0.content`` / ``messages[0].content``.

    Pydantic puts union member names ("str", "list[TextBlock]", "TextBlock") into locations; they mean
    nothing to a client, so they are dropped.
    """
    parts = [p for p in loc[1:] if isinstance(p, int) or not _TYPE_TAG.search(str(p))] if loc else []
    if anthropic:
        return ".".join(str(p) for p in parts)
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def validation_message(exc: RequestValidationError, anthropic: bool) -> tuple[str, str | None]:
    errors = list(exc.errors())
    if not errors:
        return "invalid request body", None
    # with unions pydantic reports every branch; the deepest location is the one the client meant
    err = max(errors, key=lambda e: len(e.get("loc", ())))
    if err.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    path = _field_path(err.get("loc", ()), anthropic)
    msg = str(err.get("msg", "invalid value"))
    if err.get("type") == "extra_forbidden":
        msg = "this field is not supported by this server (docs/server.md lists every field)"
    if err.get("type") == "missing" and not path:
        return "the request body is missing or empty", None
    return (f"{path}: {msg}" if path else msg), (path or None)


# ---- handlers -----------------------------------------------------------------------------------

async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(request, exc)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = validation_message(exc, is_anthropic(request))
    return error_response(request, ApiError(400, message, param=param))


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404 and request.url.path.startswith(NOT_SERVED):
        message = (f"{request.method} {request.url.path} is not supported by this server (it serves chat "
                   "completions, completions, responses, messages, count_tokens, models, and Gemini's "
                   "generateContent, countTokens and cachedContents)")
    elif exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed for {request.url.path}"
        allowed = _allowed_methods(request)
        if allowed:  # every route on this path, not only the first one Starlette tried
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
    else:
        message = str(exc.detail)
    return error_response(request, ApiError(exc.status_code, message, headers=dict(exc.headers or {})))


def _allowed_methods(request: Request) -> list[str]:
    """The methods the published spec lists for this path (every route on it)."""
    matches: list[tuple[int, set[str]]] = []
    for template, operations in request.app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)), request.url.path):
            literal = len(re.sub(r"\{[^}]+\}", "", template))  # the most specific template names the path
            matches.append((literal, {m.upper() for m in operations}))
    best = max((n for n, _ in matches), default=0)
    return sorted(set().union(*(ms for n, ms in matches if n == best)))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(request, ApiError(500, f"internal server error: {type(exc).__name__}"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
