"""Benchmark any OpenAI-compatible server (promptcache, vLLM, llama.cpp) with the same workloads.

Each request is a streamed ``POST /v1/completions`` with the prompt as a list of token ids (all
three servers accept that), greedy, ``ignore_eos``, and ``stream_options.include_usage`` so the
final chunk carries ``usage.prompt_tokens_details.cached_tokens``. TTFT is the arrival of the
first chunk that carries a choice, i.e. the first generated token. ``return_token_ids`` (vLLM)
and ``return_tokens`` (llama.cpp) ask for the generated ids; servers that ignore both are
compared on text. A remote cache cannot be reset, so ``can_reset`` is False and callers use
fresh token ids wherever they need a cold start.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from promptcache.bench.backends import OnDone, RequestResult
from promptcache.bench.workloads import BenchRequest


def api_base(url: str) -> str:
    base = url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


class HttpBackend:
    can_reset = False

    def __init__(self, url: str, model: str | None = None, name: str = "http", api_key: str | None = None,
                 timeout_s: float = 3600.0, transport: Any = None) -> None:
        import httpx

        self.base = api_base(url)
        self.transport = transport  # an httpx transport (tests); None: the network
        self.name = name
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(timeout_s, connect=10.0)
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        import httpx

        with httpx.Client(transport=self.transport, headers=self.headers, timeout=self.timeout) as client:
            resp = client.get(f"{self.base}/models")
        resp.raise_for_status()
        models = resp.json().get("data") or []
        if not models:
            raise ValueError(f"{self.base}/models lists no model; pass --served-model NAME")
        return str(models[0]["id"])

    def body(self, req: BenchRequest) -> dict[str, Any]:
        return {
            "model": self.model, "prompt": req.prompt_ids, "max_tokens": req.max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True, "return_token_ids": True, "return_tokens": True,
        }

    def run_wave(self, requests: list[BenchRequest], on_done: OnDone | None = None) -> list[RequestResult]:
        return asyncio.run(self._wave(requests, on_done))

    async def _wave(self, requests: list[BenchRequest], on_done: OnDone | None) -> list[RequestResult]:
        import httpx

        limits = httpx.Limits(max_connections=len(requests) + 1)
        async with httpx.AsyncClient(
            timeout=self.timeout, headers=self.headers, limits=limits, transport=self.transport
        ) as client:
            return list(await asyncio.gather(*(self._one(client, r, on_done) for r in requests)))

    async def _one(self, client: Any, req: BenchRequest, on_done: OnDone | None) -> RequestResult:
        start = time.perf_counter()
        first: float | None = None
        texts: list[str] = []
        ids: list[int] = []
        usage: dict[str, Any] = {}
        async with client.stream("POST", f"{self.base}/completions", json=self.body(req)) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")[:500]
                raise ValueError(f"{self.base}/completions answered {resp.status_code}: {detail}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                for choice in chunk.get("choices") or []:
                    if first is None:
                        first = time.perf_counter()
                    texts.append(choice.get("text") or "")
                    ids.extend(int(t) for t in (choice.get("token_ids") or choice.get("tokens") or []))
                usage = chunk.get("usage") or usage
        end = time.perf_counter()
        if on_done is not None:
            on_done()
        details = usage.get("prompt_tokens_details") or {}
        return RequestResult(
            name=req.name,
            prompt_tokens=int(usage.get("prompt_tokens", len(req.prompt_ids))),
            cached_tokens=int(details.get("cached_tokens") or 0),
            output_ids=ids,
            output_text="".join(texts),
            completion_tokens=int(usage.get("completion_tokens", len(ids))),
            ttft_s=(first or end) - start,
            latency_s=end - start,
        )

    def reset_cache(self) -> None:
        raise NotImplementedError("a remote server's prefix cache cannot be reset from the client")

    def counters(self) -> dict[str, int]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"backend": "http", "url": self.base, "model": self.model}
