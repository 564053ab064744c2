"""The FastAPI application: every dialect on one async engine, plus /health, /metrics, /docs and /dashboard."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST

from promptcache.engine.api import AsyncEngine
from promptcache.server import anthropic_api, gemini_api, gemini_caches, openai_api, openapi, responses_api
from promptcache.server.auth import is_operator
from promptcache.server.config import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_DIAGNOSIS_HISTORY,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_OUTPUT_CAP,
)
from promptcache.server.costs import PriceTable
from promptcache.server.dashboard import add_dashboard
from promptcache.server.diagnosis import History
from promptcache.server.errors import install_error_handlers
from promptcache.server.metrics import ServerMetrics, StatusCounterMiddleware
from promptcache.server.middleware import ApiGuard
from promptcache.server.state import ServerState, get_state, prompt_char_limit

DESCRIPTION = """Self-hosted prompt-caching LLM server.

Speaks the OpenAI (`/v1/chat/completions`, `/v1/completions`, `/v1/responses`, `/v1/models`),
Anthropic (`/v1/messages`, `/v1/messages/count_tokens`) and Gemini (`/v1beta/models/{model}:
generateContent`, `:streamGenerateContent`, `:countTokens`, `/v1beta/cachedContents`) dialects and
reports prompt caching in each one's usage fields. With an API-key file, each key's tenant is its
own cache namespace."""


def create_app(
    aengine: AsyncEngine,
    api_keys: dict[str, str] | None = None,
    model_names: Sequence[str] | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    admin_keys: Sequence[str] = (),
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    diagnosis_history: int = DEFAULT_DIAGNOSIS_HISTORY,
    prices: str | PriceTable | None = None,
    default_max_tokens: int = DEFAULT_OUTPUT_CAP,
    max_pinned_tokens: int | None = None,
) -> FastAPI:
    """An app serving ``aengine`` (which the caller starts and shuts down).

    ``api_keys`` maps API keys to tenant names; None leaves the server open and single-tenant.
    With API keys, ``/metrics`` and the details of ``/health`` (they show every tenant's traffic)
    need one of ``admin_keys``; plain liveness stays open.
    ``model_names`` are the ids clients may send (default: the engine's model name); the first one
    is listed first and reported in responses. Request bodies above ``max_request_bytes`` get a 413.
    ``diagnosis_history`` prompts per tenant are kept to explain misses (0: none); ``prices`` is a
    price-table file (or table) for the cost fields (default: ``costs.DEFAULT_PRICES``).
    """
    names = tuple(model_names or (aengine.info.model_name,))
    operators = tuple(admin_keys)
    if not names or any(not n for n in names):
        raise ValueError("model_names must be non-empty strings")
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
    if not 0 < body_timeout_s < float("inf"):
        raise ValueError(f"body_timeout_s must be a positive number of seconds, got {body_timeout_s}")
    # /docs and /redoc load Swagger UI and ReDoc from the installed package, not a CDN
    app = FastAPIOffline(title="promptcache", description=DESCRIPTION, version="0.1.0")
    metrics = ServerMetrics(aengine)
    max_prompt_chars = prompt_char_limit(aengine.info.tokenizer, aengine.info.max_model_len)
    price_table = prices if isinstance(prices, PriceTable) else PriceTable.load(prices, names)
    app.state.server = ServerState(aengine=aengine, api_keys=api_keys, model_names=names, metrics=metrics,
                                   max_prompt_chars=max_prompt_chars, history=History(max_records=diagnosis_history),
                                   prices=price_table, output_cap=default_max_tokens, pin_budget=max_pinned_tokens)
    install_error_handlers(app)
    openapi.fix_openapi(app, names, aengine.info.vocab_size, api_keys is not None)
    app.include_router(openai_api.router)
    app.include_router(anthropic_api.router)
    app.include_router(responses_api.router)
    app.include_router(gemini_api.router)
    app.include_router(gemini_caches.router)
    add_dashboard(app, api_keys, operators)

    @app.get("/health", tags=["Server"], summary="Liveness: 200 while the engine loop runs",
             responses=openapi.HEALTH)
    async def health(request: Request) -> JSONResponse:
        aeng = get_state(request).aengine
        error = aeng.error
        if error is not None or not aeng.is_alive:  # the details are in the server log
            reason = type(error).__name__ if error is not None else "the engine loop is not running"
            return JSONResponse({"status": "error", "error": reason}, status_code=503)
        if not is_operator(request, api_keys, operators):
            return JSONResponse({"status": "ok"})  # liveness only: details are for operators
        stats = _health_stats((await run_in_threadpool(aeng.snapshot)).counters)
        return JSONResponse({"status": "ok", "model": names[0], **stats})

    @app.get("/metrics", tags=["Server"], summary="Prometheus metrics (an operator key when API keys are set)",
             responses=openapi.METRICS, response_class=PlainTextResponse)
    async def prometheus(request: Request) -> Response:
        if not is_operator(request, api_keys, operators):
            return JSONResponse({"error": {"message": "/metrics needs an operator key (--admin-keys) on a server "
                                           "with API keys", "type": "authentication_error"}}, status_code=401)
        body = await run_in_threadpool(get_state(request).metrics.render)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(ApiGuard, api_keys=api_keys, max_request_bytes=max_request_bytes,
                       body_timeout_s=body_timeout_s)
    app.add_middleware(StatusCounterMiddleware, metrics=metrics)  # outermost: counts the guard's 401/413s
    return app


def _health_stats(stats: dict[str, int]) -> dict[str, int]:
    return {k: stats[k] for k in ("requests_running", "requests_waiting", "blocks_total", "blocks_in_use")}
