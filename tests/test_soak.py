"""Soak: 64 concurrent clients for two identical rounds against a real server with a pool small
enough to force eviction and preemption — mixed tenants and dialects (official SDKs), shared and
distinct prefixes, streams dropped mid-way, malformed bodies mixed in.

After each round: no error but the expected 400s for the malformed bodies, every block back,
``check_integrity()`` clean; after the second the process' RSS is within 10% of after the first
(memory is bounded by what is live, not by how much was served).

``python tests/test_soak.py --seconds 180`` runs a longer soak by hand and prints the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI
from test_server_harness import MODEL, Server, long_text, running, serve, wait_until

from promptcache.engine.config import EngineConfig
from promptcache.engine.llm_engine import LLMEngine

KEYS = {"sk-soak-a": "tenant-a", "sk-soak-b": "tenant-b", "sk-soak-c": "tenant-c"}
CLIENTS = 64
ROUND_S = 40.0
NUM_BLOCKS = 96  # x 16 tokens: far less than 64 clients' prompts need at once
SYSTEMS = [long_text(120, f"[shared system prompt {i}]") for i in range(4)]
MALFORMED = [b"{", b'{"model": 1}', b'{"model": "%s", "messages": []}' % MODEL.encode(),
             b'{"model": "%s", "max_tokens": "7", "prompt": "x"}' % MODEL.encode()]


@dataclass
class RoundResult:
    outcomes: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)


async def _openai_chat(client: AsyncOpenAI, system: str, question: str, rng: random.Random, out: RoundResult) -> None:
    messages: Any = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=rng.randint(4, 24),
                                                  stream=True, stream_options={"include_usage": True})
    drop_after = rng.randint(1, 6) if rng.random() < 0.25 else None
    chunks = 0
    async with contextlib.aclosing(stream.__aiter__()) as events:  # closed here, not by a GC elsewhere
        async for _ in events:
            chunks += 1
            if drop_after is not None and chunks >= drop_after:
                break
    await stream._iterator.aclose()  # the SDK leaves its inner generators to a GC finalizer otherwise
    await stream.close()  # when dropped: a hang-up mid-stream, which must free the request's blocks
    out.outcomes["dropped" if drop_after is not None and chunks >= drop_after else "openai-chat"] += 1


async def _openai_completion(client: AsyncOpenAI, system: str, question: str, rng: random.Random,
                             out: RoundResult) -> None:
    r = await client.completions.create(model=MODEL, prompt=system + "\n" + question, max_tokens=rng.randint(1, 16))
    assert r.usage is not None and r.usage.completion_tokens >= 1
    out.outcomes["openai-completion"] += 1


async def _anthropic(client: AsyncAnthropic, system: str, question: str, rng: random.Random, out: RoundResult) -> None:
    async with client.messages.stream(
            model=MODEL, max_tokens=rng.randint(4, 24),
            system=[{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
            messages=[{"role": "user", "content": question}]) as stream:
        async for _ in stream.text_stream:
            pass
        final = await stream.get_final_message()
    assert final.usage.output_tokens >= 1
    out.outcomes["anthropic"] += 1


async def _malformed(http: httpx.AsyncClient, key: str, rng: random.Random, out: RoundResult) -> None:
    path = rng.choice(["/v1/chat/completions", "/v1/completions", "/v1/messages"])
    r = await http.post(path, content=rng.choice(MALFORMED),
                        headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    if r.status_code != 400:
        out.unexpected.append(f"malformed body to {path}: {r.status_code} {r.text[:200]}")
    out.outcomes["malformed-400"] += 1


async def _client(url: str, worker: int, seed: int, deadline: float, out: RoundResult) -> None:
    rng = random.Random(seed * 1000 + worker)
    key = list(KEYS)[worker % len(KEYS)]
    oai = AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
    ant = AsyncAnthropic(base_url=url, api_key=key, max_retries=0, timeout=120)
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            system = rng.choice(SYSTEMS) if rng.random() < 0.7 else long_text(60, f"[own prefix {worker}-{n}]")
            question = f"question {rng.randint(0, 50)} from {worker}"
            kind = rng.choices(["chat", "completion", "anthropic", "malformed"], [5, 2, 4, 0.4])[0]
            try:
                if kind == "chat":
                    await _openai_chat(oai, system, question, rng, out)
                elif kind == "completion":
                    await _openai_completion(oai, system, question, rng, out)
                elif kind == "anthropic":
                    await _anthropic(ant, system, question, rng, out)
                else:
                    await _malformed(http, key, rng, out)
            except Exception as e:  # every failure of a well-formed request is unexpected
                out.unexpected.append(f"{kind}: {type(e).__name__}: {str(e)[:300]}")
    await oai.close()
    await ant.close()


def soak_round(server: Server, seconds: float, seed: int) -> RoundResult:
    out = RoundResult()

    async def main() -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(_client(server.url, w, seed, deadline, out) for w in range(CLIENTS)))

    asyncio.run(main())
    return out


def settle(server: Server) -> dict[str, int]:
    """Wait until nothing runs and no block is held; then the pool's bookkeeping must be exact."""
    idle = wait_until(lambda: (s := server.stats())["requests_running"] == 0 and s["requests_waiting"] == 0
                      and s["blocks_in_use"] == 0, timeout_s=30)
    stats = server.stats()
    assert idle, f"requests or blocks still held after the round: {stats}"
    server.check_integrity()
    return stats


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def run_soak(seconds: float, rounds: int = 2) -> list[dict[str, Any]]:
    reports = []
    # bfloat16: the dtype a native-bf16 CPU serves in (its matmuls go through oneDNN: test_memory.py)
    engine = LLMEngine(EngineConfig.of(model=MODEL, dtype="bfloat16", device="cpu", num_blocks=NUM_BLOCKS,
                                       max_model_len=1024, max_num_batched_tokens=1024))
    with running(engine, max_waiting=CLIENTS * 2) as aengine, \
            serve(aengine, KEYS, keep_alive_s=3600) as srv:  # no idle-close race: every failure is ours
        for r in range(rounds):
            started = time.monotonic()
            result = soak_round(srv, seconds, seed=7)  # identical rounds
            stats = settle(srv)
            reports.append({"round": r + 1, "seconds": round(time.monotonic() - started, 1),
                            "rss_mb": round(rss_mb(), 1), "outcomes": dict(result.outcomes),
                            "unexpected": result.unexpected, "preemptions": stats["preemptions"],
                            "evictions": stats["blocks_evicted"], "cached_tokens": stats["cached_tokens"]})
    return reports


def test_soak_two_identical_rounds() -> None:
    first, second = run_soak(ROUND_S)
    for report in (first, second):
        assert report["unexpected"] == [], report["unexpected"][:10]
        assert report["outcomes"].get("dropped", 0) > 0 and report["outcomes"].get("malformed-400", 0) > 0
        assert sum(report["outcomes"].values()) > 200, report["outcomes"]
    assert second["preemptions"] > 0 and second["evictions"] > 0 and second["cached_tokens"] > 0, second
    assert second["rss_mb"] <= first["rss_mb"] * 1.10, (first["rss_mb"], second["rss_mb"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=ROUND_S)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    for report in run_soak(args.seconds, args.rounds):
        print(json.dumps(report))
    sys.exit(0)
