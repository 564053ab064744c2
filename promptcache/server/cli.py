"""``promptcache serve``: build the engine, start its loop, serve the app with uvicorn.

Imports stay inside the functions: ``promptcache --help`` must not load the model stack or FastAPI.
"""

from __future__ import annotations

import argparse
import errno
import signal
import socket
import sys
import threading
from typing import Any


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    from promptcache.engine.config import add_engine_flags
    from promptcache.flags import add_flags
    from promptcache.server.config import ServerConfig

    p: argparse.ArgumentParser = sub.add_parser(
        "serve", help="OpenAI- and Anthropic-compatible HTTP server with prompt caching",
        description="Serve a model over HTTP: /v1/chat/completions, /v1/completions, /v1/models (OpenAI), "
                    "/v1/messages, /v1/messages/count_tokens (Anthropic), /health, /metrics, /docs.",
    )
    add_engine_flags(p)
    add_flags(p.add_argument_group("server"), ServerConfig)
    p.set_defaults(func=serve)
    return p


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from promptcache.engine.async_engine import AsyncEngine
    from promptcache.engine.config import engine_config_from_args
    from promptcache.engine.llm_engine import LLMEngine
    from promptcache.flags import values_from_args
    from promptcache.server.app import create_app
    from promptcache.server.auth import load_admin_keys, load_api_keys
    from promptcache.server.config import ServerConfig

    cfg = ServerConfig(**values_from_args(ServerConfig, args))
    api_keys = load_api_keys(cfg.api_keys) if cfg.api_keys else None
    admin_keys = load_admin_keys(cfg.admin_keys) if cfg.admin_keys else ()
    if api_keys and not admin_keys:
        print("promptcache: note: --api-keys without --admin-keys: /metrics answers 401 to everyone",
              file=sys.stderr)
    elif admin_keys and not api_keys:
        print("promptcache: note: --admin-keys without --api-keys: the server is open, /metrics too",
              file=sys.stderr)
    if cfg.replicas > 0:
        return _serve_cluster(cfg, args, api_keys, admin_keys)
    sock = _bind(cfg.host, cfg.port)  # before the model loads: a port in use is one line, at once
    engine = LLMEngine(engine_config_from_args(args))
    aengine = AsyncEngine(engine, max_waiting=cfg.max_waiting)
    app = create_app(aengine, api_keys, cfg.served_model_name, cfg.max_request_bytes, admin_keys,
                     cfg.body_timeout_s, cfg.diagnosis_history, cfg.prices, cfg.default_max_tokens,
                     cfg.max_pinned_tokens)
    _log_requests(cfg.log_level)
    info = aengine.info
    tiers = f"; below memory: {', '.join(info.tiers)}" if info.tiers else ""
    tenants = "open, single tenant"
    if api_keys:
        tenants = f"{len(set(api_keys.values()))} tenant(s) from {cfg.api_keys}"
    print(f"promptcache: serving {info.model_name} ({info.precision}; {info.max_model_len} tokens context, "
          f"{info.num_blocks} KV blocks of {info.block_size}{tiers}; {tenants}) at "
          f"http://{cfg.host}:{cfg.port}  (docs: http://{cfg.host}:{cfg.port}/docs)", flush=True)
    # HTTP on a thread, the engine loop on this one: steps run 1.7x faster on the main thread
    # (AsyncEngine.run_here). uvicorn installs no signal handlers off the main thread: these stop it
    # gracefully (in-flight requests finish; the engine runs until the HTTP thread is done).
    server = uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level))
    web = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="promptcache-http", daemon=True)

    def stop(signum: int, frame: Any) -> None:
        server.force_exit = server.should_exit  # a second signal: do not wait for connections
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    web.start()
    try:
        aengine.run_here(until=lambda: not web.is_alive())
    finally:
        server.should_exit = True
        web.join(timeout=30)
        aengine.shutdown()
        sock.close()
    return 0


def _serve_cluster(cfg: Any, args: argparse.Namespace, api_keys: dict[str, str] | None,
                   admin_keys: tuple[str, ...]) -> int:
    """``--replicas N``: Ray on this machine, N engine replicas behind cache-aware routing, the same
    app as the ingress (cluster/serve_app.py); blocks until interrupted."""
    from promptcache.engine.config import engine_config_from_args

    try:
        from promptcache.cluster import serve_app
    except ImportError as e:
        raise ValueError(f"--replicas needs Ray Serve: pip install 'promptcache[cluster]' ({e})") from None
    _bind(cfg.host, cfg.port).close()  # a port in use is one line, before Ray starts
    engine_config = engine_config_from_args(args)
    app_options = {"api_keys": api_keys, "model_names": cfg.served_model_name, "admin_keys": admin_keys,
                   "max_request_bytes": cfg.max_request_bytes, "body_timeout_s": cfg.body_timeout_s,
                   "diagnosis_history": cfg.diagnosis_history, "prices": cfg.prices,
                   "default_max_tokens": cfg.default_max_tokens, "max_pinned_tokens": cfg.max_pinned_tokens}
    app = serve_app.build(engine_config, cfg.replicas, app_options, routing=cfg.routing, max_waiting=cfg.max_waiting,
                          cpus_per_replica=cfg.cpus_per_replica)
    _log_requests(cfg.log_level)
    stop = threading.Event()
    try:
        serve_app.start_local(app, cfg.host, cfg.port)
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
            signal.signal(sig, lambda *_: stop.set())
        print(f"promptcache: serving {cfg.replicas} replica(s) on Ray Serve, routing: {cfg.routing}, at "
              f"http://{cfg.host}:{cfg.port}  (dashboard: http://{cfg.host}:{cfg.port}/dashboard)", flush=True)
        stop.wait()
    finally:
        serve_app.stop_local()
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything is printed or loaded (ValueError: one line)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}"
                         + (" (another server is using it; pick another --port)" if e.errno == errno.EADDRINUSE
                            else "")) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _log_requests(level: str) -> None:
    """The per-request line (``promptcache.requests``, server/misses.py) to stderr, beside uvicorn's."""
    import logging

    logger = logging.getLogger("promptcache")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
