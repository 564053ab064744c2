"""A real promptcache server on a loopback port, with the engine in-process (for integrity checks)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from openai import AuthenticationError, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from promptcache.engine.async_engine import AsyncEngine
from promptcache.engine.config import EngineConfig
from promptcache.engine.llm_engine import LLMEngine
from promptcache.server.app import create_app

MODEL = "random:tiny"
KEYS = {"sk-acme-0001": "acme", "sk-globex-0002": "globex"}


def tiny_engine(num_blocks: int = 1024, max_model_len: int = 4096, model: str = MODEL, **config: Any) -> LLMEngine:
    return LLMEngine(EngineConfig.of(model=model, dtype="float32", device="cpu", num_blocks=num_blocks,
                                  max_model_len=max_model_len, max_num_batched_tokens=1024, **config))


@dataclass
class Server:
    url: str
    aengine: AsyncEngine

    @property
    def engine(self) -> LLMEngine:
        return self.aengine.engine

    def stats(self) -> dict[str, int]:
        return self.aengine.call(lambda e: e.stats())

    def check_integrity(self) -> None:
        self.aengine.call(lambda e: e.check_integrity())


@contextmanager
def serve(aengine: AsyncEngine, api_keys: dict[str, str] | None = None, keep_alive_s: float = 5.0,
          **app_options: Any) -> Iterator[Server]:
    """uvicorn on 127.0.0.1, an ephemeral port, in a thread; stopped on exit. ``keep_alive_s`` is
    uvicorn's idle keep-alive timeout (its default 5 s races clients that reuse a connection just
    as the server closes it; SDKs retry that, clients with ``max_retries=0`` do not)."""
    app = create_app(aengine, api_keys, **app_options)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                            timeout_keep_alive=keep_alive_s)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Server(f"http://127.0.0.1:{port}", aengine)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def running(engine: LLMEngine, max_waiting: int = 256) -> Iterator[AsyncEngine]:
    aengine = AsyncEngine(engine, max_waiting=max_waiting)
    aengine.start()
    try:
        yield aengine
    finally:
        aengine.shutdown()


def nonce() -> str:
    """A unique opening for a prompt, so no test hits blocks an earlier test cached."""
    return f"[session {uuid.uuid4().hex}]"


def long_text(num_words: int, seed: str = "") -> str:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
             "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]
    return seed + " " + " ".join(words[(i * 7 + i // 20) % len(words)] for i in range(num_words))


def wait_until(predicate: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)


def text_of_tokens(tok: Any, num_tokens: int, opening: str) -> str:
    """Prose of about ``num_tokens`` tokens (at least), opening with ``opening``."""
    words = 50
    while len(tok.encode(long_text(words, opening))) < num_tokens:
        words = int(words * 1.5)
    lo, hi = words // 2, words
    while lo < hi:  # fewest words that reach num_tokens
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if len(tok.encode(long_text(mid, opening))) < num_tokens else (lo, mid)
    return long_text(lo, opening)


# ---- the harness' own checks: health, docs, models, metrics, CLI ---------------------------------


def test_health_docs_and_models(server: Server) -> None:
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert httpx.get(f"{server.url}/docs").status_code == 200
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/messages/count_tokens"):
        assert path in paths
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    anthropic_headers = {"anthropic-version": "2023-06-01"}
    anthropic_models = httpx.get(f"{server.url}/v1/models", headers=anthropic_headers).json()
    assert anthropic_models["data"][0] == {"type": "model", "id": MODEL, "display_name": MODEL,
                                           "created_at": "1970-01-01T00:00:00Z"}


def test_unknown_route_is_an_enveloped_404(server: Server) -> None:
    r = httpx.post(f"{server.url}/v1/nothing", json={})
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "Invalid URL (POST /v1/nothing)"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_follow_the_engine(server: Server) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    prompt = text_of_tokens(server.engine.tokenizer, 100, nonce())
    for _ in range(2):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    r = httpx.get(f"{server.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = _samples(r.text)
    stats = server.stats()
    assert samples[("promptcache_prompt_tokens_total", ())] == stats["prompt_tokens"] > 0
    assert samples[("promptcache_cached_tokens_total", ())] == stats["cached_tokens"] >= 96
    assert samples[("promptcache_computed_tokens_total", ())] == stats["computed_tokens"]
    hit_rate = stats["cached_tokens"] / stats["prompt_tokens"]
    assert samples[("promptcache_prefix_cache_hit_rate", ())] == hit_rate
    assert samples[("promptcache_kv_blocks", (("state", "free"),))] == stats["blocks_empty"]
    assert samples[("promptcache_kv_blocks", (("state", "cached"),))] == stats["blocks_cached"] > 0
    assert samples[("promptcache_kv_blocks", (("state", "in_use"),))] == 0
    assert samples[("promptcache_requests_finished_total", (("reason", "length"),))] >= 2
    ok = (("endpoint", "/v1/completions"), ("status", "200"))
    assert samples[("promptcache_http_requests_total", ok)] >= 2
    ttft = (("endpoint", "/v1/completions"),)
    assert samples[("promptcache_time_to_first_token_seconds_count", ttft)] >= 2


def test_eviction_metrics_count_real_evictions() -> None:
    """A 16-block pool: a retained prompt, then a prompt that needs some of its blocks (early
    evictions), then one that only needs the previous prompt's unretained blocks (no early ones)."""
    block, num_blocks = 16, 16
    with running(tiny_engine(num_blocks=num_blocks)) as aengine, serve(aengine) as srv:
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)

        def blocks_for(num_tokens: int, **fields: Any) -> tuple[int, int]:
            """(blocks the request needs, full prompt blocks it leaves cached); it generates 1 token."""
            prompt = text_of_tokens(srv.engine.tokenizer, num_tokens, nonce())
            r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body=fields)
            assert r.usage is not None
            return -(-(r.usage.prompt_tokens + 1) // block), r.usage.prompt_tokens // block

        def evictions() -> tuple[float, float]:
            samples, stats = _samples(httpx.get(f"{srv.url}/metrics").text), srv.stats()
            evicted = samples[("promptcache_block_evictions_total", ())]
            early = samples[("promptcache_early_evictions_total", ())]
            assert (evicted, early) == (stats["blocks_evicted"], stats["early_evictions"])
            return evicted, early

        _, retained = blocks_for(100, prompt_cache_retention="in_memory")  # kept 10 minutes
        assert evictions() == (0, 0)
        need, cached = blocks_for(200)  # more than the free blocks; nothing unretained to evict
        early = need - (num_blocks - retained)
        assert early > 0 and evictions() == (early, early)
        need2, _ = blocks_for(200)  # the previous prompt's LRU blocks go first: nothing early
        free = num_blocks - (retained - early) - cached
        assert need2 > free and evictions() == (early + need2 - free, early)
        srv.check_integrity()


def test_serve_cli_end_to_end(tmp_path: Path) -> None:
    """``promptcache serve`` as a user runs it: a subprocess, an API-key file, the OpenAI SDK."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS))
    admin = tmp_path / "admin.json"
    admin.write_text(json.dumps(["sk-ops-0009"]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "promptcache.cli", "serve", "--model", MODEL, "--dtype", "float32",
           "--device", "cpu", "--kv-cache-memory", "8MiB", "--max-model-len", "1024", "--port", str(port),
           "--api-keys", str(keys), "--admin-keys", str(admin), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(healthy, timeout_s=60, interval_s=0.2), "server did not come up"
        client = OpenAI(base_url=f"{url}/v1", api_key="sk-acme-0001", max_retries=0)
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=3)
        assert r.usage is not None and r.usage.completion_tokens >= 1
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0).models.list()
        assert httpx.get(f"{url}/metrics", headers={"authorization": "Bearer sk-acme-0001"}).status_code == 401
        assert httpx.get(f"{url}/metrics", headers={"authorization": "Bearer sk-ops-0009"}).status_code == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert f"http://127.0.0.1:{port}" in out
    assert proc.returncode == 0, out  # SIGTERM: HTTP (its own thread) drains, then the engine loop stops


def test_openapi_spec_lists_what_the_server_answers(server: Server) -> None:
    """Every status a route can return, in its dialect's envelope, with its content types; no 422
    (validation errors are 400s); limits the server enforces are in the schemas."""
    spec = httpx.get(f"{server.url}/openapi.json").json()
    paths = spec["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/messages"):
        responses = paths[path]["post"]["responses"]
        assert set(responses) == {"200", "400", "401", "404", "408", "413", "429", "503"}, path
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        envelope = responses["400"]["content"]["application/json"]["schema"]["required"]
        assert envelope == (["type", "error"] if path == "/v1/messages" else ["error"])
    assert "422" not in str({p: {m: op["responses"] for m, op in ops.items()} for p, ops in paths.items()})
    assert "HTTPValidationError" not in spec.get("components", {}).get("schemas", {})
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert "503" in paths["/health"]["get"]["responses"]
    schemas = spec["components"]["schemas"]
    assert schemas["MessagesRequest"]["properties"]["top_p"]["exclusiveMinimum"] == 0.0  # top_p 0 is a 400
    assert schemas["ChatCompletionRequest"]["properties"]["n"]["maximum"] == 8  # n 9 is a 400
    assert schemas["TextBlock"]["properties"]["type"]["enum"] == ["text"]  # system: text only
    assert schemas["ContentBlock"]["properties"]["type"]["enum"] == ["text", "tool_use", "tool_result"]
