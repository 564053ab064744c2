"""The Redis tier against a real redis-server (started, killed, paused by the tests), and the disk
tier through real servers: sharing between servers, faults, a crash mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from anthropic import Anthropic
from openai import OpenAI
from redis_server import RedisServer, free_port
from test_server_harness import MODEL, _samples, running, serve, tiny_engine

from promptcache import LLM, SamplingParams
from promptcache.cache.redis_tier import KEY_PREFIX
from promptcache.cache.tier_format import verify

BS = 16
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def prompt_ids(n: int, seed: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 3900 + 20 for i in range(n)]


def redis_engine(url: str, **kw: Any):
    return tiny_engine(redis_url=url, tier_skip_slower=False, redis_timeout=0.2, redis_cooldown=0.5, **kw)


def flush(aengine: Any) -> None:
    assert aengine.call(lambda e: e.tiers.flush(20))


def tier_stats(aengine: Any, tier: str = "redis") -> dict[str, Any]:
    return aengine.call(lambda e: e.tier_stats())[tier]


def test_two_servers_on_one_redis_share_prefixes(redis_server: RedisServer) -> None:
    with running(redis_engine(redis_server.url)) as a, serve(a) as srv_a, \
            running(redis_engine(redis_server.url)) as b, serve(b) as srv_b:
        prompt = prompt_ids(320, 1)  # 20 blocks
        oa = OpenAI(base_url=f"{srv_a.url}/v1", api_key="x", max_retries=0)
        ob = OpenAI(base_url=f"{srv_b.url}/v1", api_key="x", max_retries=0)
        first = oa.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
        assert first.usage is not None and first.usage.prompt_tokens_details.cached_tokens == 0
        flush(a)
        second = ob.completions.create(model=MODEL, prompt=prompt + [7, 8, 9], max_tokens=4, temperature=0)
        assert second.usage is not None and second.usage.prompt_tokens_details.cached_tokens == 320
        assert second.usage.model_extra["promptcache_cached_tokens_by_tier"] == {"memory": 0, "redis": 320}
        assert tier_stats(b)["hit_blocks"] == 20
        samples = _samples(httpx.get(f"{srv_b.url}/metrics").text)
        assert samples[("promptcache_tier_hit_blocks_total", (("tier", "redis"),))] == 20
        assert samples[("promptcache_tier_cached_tokens_total", (("tier", "redis"),))] == 320

        # the Anthropic dialect counts a Redis hit as a cache read too
        ca = Anthropic(base_url=srv_a.url, api_key="x", max_retries=0)
        cb = Anthropic(base_url=srv_b.url, api_key="x", max_retries=0)
        system = "You answer briefly. " * 60
        msgs = [{"role": "user", "content": "hello there"}]
        ca.messages.create(model=MODEL, max_tokens=2, system=system, messages=msgs)  # type: ignore[arg-type]
        flush(a)
        r = cb.messages.create(model=MODEL, max_tokens=2, system=system, messages=msgs)  # type: ignore[arg-type]
        assert r.usage.cache_read_input_tokens is not None and r.usage.cache_read_input_tokens >= 10 * BS
        split = r.usage.model_extra["promptcache_cached_tokens_by_tier"]
        assert split["redis"] == r.usage.cache_read_input_tokens and split["memory"] == 0

        # ... and Gemini's usageMetadata, with the split in its camelCase
        body = {"contents": [{"role": "user", "parts": [{"text": "Once more: " + system}]}],
                "generationConfig": {"maxOutputTokens": 2}}
        httpx.post(f"{srv_a.url}/v1beta/models/{MODEL}:generateContent", json=body, timeout=60)
        flush(a)
        meta = httpx.post(f"{srv_b.url}/v1beta/models/{MODEL}:generateContent", json=body,
                          timeout=60).json()["usageMetadata"]
        assert meta["cachedContentTokenCount"] >= 10 * BS
        assert meta["promptcacheCachedTokensByTier"] == {"memory": 0, "redis": meta["cachedContentTokenCount"]}
        srv_a.check_integrity()
        srv_b.check_integrity()


def test_a_dead_redis_costs_misses_never_requests(redis_server: RedisServer) -> None:
    with running(redis_engine(redis_server.url)) as a, serve(a) as srv:
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
        redis_server.kill()
        for seed in range(4):
            r = client.completions.create(model=MODEL, prompt=prompt_ids(200, 10 + seed), max_tokens=3)
            assert r.usage is not None and r.usage.completion_tokens == 3
        flush(a)
        stats = tier_stats(a)
        assert stats["errors"] >= 1 and stats["hit_blocks"] == 0
        samples = _samples(httpx.get(f"{srv.url}/metrics").text)
        assert samples[("promptcache_tier_errors_total", (("tier", "redis"),))] == stats["errors"]

        redis_server.start()  # back, empty, on the same port
        time.sleep(0.6)  # the breaker's cooldown
        prompt = prompt_ids(200, 20)

        def hits_again() -> bool:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
            flush(a)
            a.call(lambda e: e.reset_prefix_cache())  # memory forgets: only Redis can answer
            r = client.completions.create(model=MODEL, prompt=prompt + [5], max_tokens=2)
            return r.usage is not None and r.usage.prompt_tokens_details.cached_tokens == 192

        assert hits_again() or hits_again()  # the first call after the cooldown may be the probe
        srv.check_integrity()


def test_a_hung_redis_does_not_stall_requests(redis_server: RedisServer) -> None:
    with running(redis_engine(redis_server.url)) as a, serve(a) as srv:
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=30)
        client.completions.create(model=MODEL, prompt=prompt_ids(100, 30), max_tokens=1)  # connected
        redis_server.pause()
        try:
            started = time.monotonic()
            for seed in range(3):
                r = client.completions.create(model=MODEL, prompt=prompt_ids(200, 31 + seed), max_tokens=2)
                assert r.usage is not None and r.usage.completion_tokens == 2
            # each lookup gives up after redis_timeout (0.2 s); after 3 failures the circuit opens
            assert time.monotonic() - started < 10
            assert tier_stats(a)["errors"] >= 1
        finally:
            redis_server.resume()
        srv.check_integrity()


def test_tenants_never_share_a_redis_key(redis_server: RedisServer) -> None:
    engine = LLM("random:tiny", dtype="float32", num_blocks=256, redis_url=redis_server.url, tier_skip_slower=False)
    prompt = prompt_ids(160, 40)
    keys: list[set[str]] = []
    for tenant in ("acme", "globex"):
        before = set(engine.engine.tiers.stack.tiers[0].stored_keys())
        out = engine.generate(prompt, GREEDY, tenant=tenant)[0]
        assert out.usage.cached_tokens == 0
        assert engine.engine.tiers.flush()
        keys.append(set(engine.engine.tiers.stack.tiers[0].stored_keys()) - before)
    assert len(keys[0]) == len(keys[1]) == 10 and not keys[0] & keys[1]
    assert all(k.startswith(KEY_PREFIX) for k in keys[0])
    engine.engine.close()


def test_concurrent_writers_of_the_same_blocks_leave_whole_objects(redis_server: RedisServer,
                                                                   tmp_path: Path) -> None:
    """Two engines (two servers) write the same prompt at once to one Redis and one directory."""
    settings = dict(dtype="float32", num_blocks=256, redis_url=redis_server.url, disk_cache=str(tmp_path),
                    tier_skip_slower=False)
    engines = [LLM("random:tiny", **settings) for _ in range(2)]
    prompt = prompt_ids(480, 50)
    threads = [threading.Thread(target=e.generate, args=(prompt, GREEDY)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in engines:
        assert e.engine.tiers.flush()
    stack = engines[0].engine.tiers.stack
    client = redis_server.client()
    keys = [k for k in client.scan_iter(KEY_PREFIX + "*")]
    assert len(keys) == 30
    for k in keys:
        h = bytes.fromhex(k.decode()[len(KEY_PREFIX):])
        verify(client.get(k), stack.namespace, h, stack.layout, stack.block_bytes)  # raises if torn
    files = list((tmp_path / "objects").rglob("*.kv"))
    assert len(files) == 30
    for f in files:
        verify(f.read_bytes(), stack.namespace, bytes.fromhex(f.stem), stack.layout, stack.block_bytes)
    for e in engines:
        e.engine.close()


# ---- a crash mid-write (a real server process, killed with SIGKILL) -----------------------------


def _serve(directory: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "promptcache.cli", "serve", "--model", MODEL, "--dtype", "float32",
           "--kv-cache-memory", "8MiB", "--disk-cache", str(directory), "--no-tier-skip-slower",
           "--port", str(port), "--log-level", "warning"]
    log = directory.parent / f"server-{port}-{time.monotonic_ns()}.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


@pytest.mark.slow
def test_a_crash_mid_write_leaves_nothing_torn_to_serve(tmp_path: Path) -> None:
    port = free_port()
    prompt = prompt_ids(320, 60)
    tmp_path = tmp_path / "disk"
    proc = _serve(tmp_path, port, {"PROMPTCACHE_TEST_DISK_WRITE_DELAY_S": "30"})
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
        deadline = time.monotonic() + 30
        while not list((tmp_path / "tmp").glob("*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.05)  # the writer is inside its first object, paused mid-payload
        assert list((tmp_path / "tmp").glob("*.tmp"))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    torn = list((tmp_path / "tmp").glob("*.tmp"))
    assert torn and not list((tmp_path / "objects").rglob("*.kv"))
    proc = _serve(tmp_path, port, {})
    try:
        samples = _samples(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
        assert samples[("promptcache_tier_discarded_at_startup", (("tier", "disk"),))] == len(torn)
        assert not list((tmp_path / "tmp").glob("*.tmp"))
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
        assert r.usage is not None and r.usage.prompt_tokens_details.cached_tokens == 0
        off = LLM(MODEL, dtype="float32", num_blocks=64, enable_prefix_caching=False)
        expected = off.generate(prompt, SamplingParams(max_tokens=6, temperature=0.0))[0].text
        assert r.choices[0].text == expected
    finally:
        proc.terminate()
        proc.wait(20)
