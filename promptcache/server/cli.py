"""``promptcache serve``: build the engine, start its loop, serve the app with uvicorn.

Imports stay inside the functions: ``promptcache --help`` must not load the model stack or FastAPI.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    from promptcache.cli import add_engine_args

    p: argparse.ArgumentParser = sub.add_parser(
        "serve", help="OpenAI- and Anthropic-compatible HTTP server with prompt caching",
        description="Serve a model over HTTP: /v1/chat/completions, /v1/completions, /v1/models (OpenAI), "
                    "/v1/messages, /v1/messages/count_tokens (Anthropic), /health, /metrics, /docs.",
    )
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-keys", metavar="FILE", default=None,
                   help='JSON object mapping API keys to tenant names, e.g. {"sk-a": "acme"}; each tenant '
                        "is its own cache namespace. Without it the server is open and single-tenant.")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="queued requests before new ones get 429 with Retry-After")
    p.add_argument("--max-request-bytes", default="32MiB", metavar="SIZE",
                   help="largest request body accepted (e.g. 32MiB, 1MB, a byte count); larger ones get 413")
    p.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                   help="model id clients send and /v1/models lists (repeatable; "
                        "default: --model or 'default')")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=serve)
    return p


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from promptcache.cli import engine_config_from_args
    from promptcache.engine.async_engine import AsyncEngine
    from promptcache.engine.config import parse_bytes
    from promptcache.engine.llm_engine import LLMEngine
    from promptcache.server.app import create_app
    from promptcache.server.auth import load_api_keys

    if args.max_waiting < 0:
        raise ValueError("--max-waiting must be >= 0")
    max_request_bytes = parse_bytes(args.max_request_bytes)
    if max_request_bytes < 1:
        raise ValueError("--max-request-bytes must be at least 1 byte")
    api_keys = load_api_keys(args.api_keys) if args.api_keys else None
    engine = LLMEngine(engine_config_from_args(args))
    aengine = AsyncEngine(engine, max_waiting=args.max_waiting)
    app = create_app(aengine, api_keys, args.served_model_name, max_request_bytes)
    aengine.start()
    tenants = "open, single tenant"
    if api_keys:
        tenants = f"{len(set(api_keys.values()))} tenant(s) from {args.api_keys}"
    print(f"promptcache: serving {engine.model_name} ({engine.precision}; {engine.max_model_len} tokens context, "
          f"{engine.stats()['blocks_total']} KV blocks of {engine.block_size}; {tenants}) at "
          f"http://{args.host}:{args.port}  (docs: http://{args.host}:{args.port}/docs)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        aengine.shutdown()
    return 0
