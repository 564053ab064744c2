"""Where a benchmark's requests go: the in-process engine, or an HTTP server (``http_client.py``).

Both run one *wave* at a time (all its requests submitted together) and report, per request, the
time to its first token and to its last, what it generated and how many prompt tokens it reused.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from promptcache.bench.workloads import BenchRequest
from promptcache.engine.llm_engine import LLMEngine
from promptcache.engine.precision import dtype_name
from promptcache.engine.request import RequestSpec
from promptcache.engine.sampling import SamplingParams

OnDone = Callable[[], None]


@dataclass
class RequestResult:
    name: str
    prompt_tokens: int
    cached_tokens: int  # as the server reports it (usage)
    output_ids: list[int]  # empty where a server returns text only
    output_text: str
    completion_tokens: int
    ttft_s: float  # submit -> first generated token
    latency_s: float  # submit -> last generated token
    wave: int = 0
    ideal_cached_tokens: int = 0  # filled in by the runner (workloads.ideal_cached_tokens)
    output_logprobs: list[float] = field(default_factory=list)  # per generated token, where known
    extra: dict[str, Any] = field(default_factory=dict)

    def same_output(self, other: RequestResult) -> bool:
        """Whether two greedy outputs agree: by token ids where both sides returned them, else by
        text (a server that returns no ids is compared on what it does return)."""
        if self.output_ids and other.output_ids:
            return self.output_ids == other.output_ids
        return self.output_text == other.output_text


class Backend(Protocol):
    name: str
    can_reset: bool  # reset_cache() really empties the prefix cache

    def run_wave(self, requests: list[BenchRequest], on_done: OnDone | None = None) -> list[RequestResult]: ...

    def reset_cache(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...

    def counters(self) -> dict[str, int]:
        """Cumulative counts the backend can see (the engine's ``stats()``; nothing over HTTP)."""
        ...


def greedy(max_tokens: int) -> SamplingParams:
    # ignore_eos: random weights may pick EOS early; every arm must generate the same count.
    # logprobs=0: each sampled token's logprob, to measure how far the arms' results are apart
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0)


class EngineBackend:
    """Drives an ``LLMEngine`` step by step in this process, timing each request's first token."""

    can_reset = True

    def __init__(self, engine: LLMEngine, name: str) -> None:
        self.engine = engine
        self.name = name
        self._ids = itertools.count()

    def run_wave(self, requests: list[BenchRequest], on_done: OnDone | None = None) -> list[RequestResult]:
        engine = self.engine
        submitted: dict[str, float] = {}
        names: dict[str, BenchRequest] = {}
        for req in requests:
            rid = f"bench-{self.name}-{next(self._ids)}"
            submitted[rid] = time.perf_counter()
            engine.add_request(RequestSpec(rid, req.prompt_ids, greedy(req.max_tokens)))
            names[rid] = req
        first: dict[str, float] = {}
        done: dict[str, RequestResult] = {}
        while len(done) < len(requests):
            if not engine.has_unfinished_requests():
                raise RuntimeError("the engine stopped before every benchmark request finished")
            for out in engine.step():
                now = time.perf_counter()
                rid = out.request_id
                if rid not in names:
                    continue
                if out.new_token_ids and rid not in first:
                    first[rid] = now
                if out.finished:
                    start = submitted[rid]
                    done[rid] = RequestResult(
                        name=names[rid].name,
                        prompt_tokens=out.usage.prompt_tokens,
                        cached_tokens=out.usage.cached_tokens,
                        output_ids=list(out.token_ids),
                        output_text=out.text,
                        completion_tokens=out.usage.completion_tokens,
                        ttft_s=first.get(rid, now) - start,
                        latency_s=now - start,
                        output_logprobs=[lp.logprob for lp in out.logprobs or []],
                    )
                    if on_done is not None:
                        on_done()
        return [done[rid] for rid in names]

    def reset_cache(self) -> None:
        self.engine.reset_prefix_cache()

    def counters(self) -> dict[str, int]:
        return self.engine.stats()

    def describe(self) -> dict[str, Any]:
        runner = self.engine.runner
        return {
            "backend": "engine",
            "model": self.engine.model_name,
            "model_dir": str(runner.model_dir),
            "dtype": dtype_name(runner.dtype),
            "compute_dtype": dtype_name(runner.compute_dtype),
            "kv_cache_dtype": dtype_name(runner.kv_dtype),
            "device": str(runner.device),
            "prefix_caching": self.engine.config.cache.enable_prefix_caching,
            "kv_bytes_per_token": runner.kv_bytes_per_token,
            "kv_cache_bytes": runner.kv_cache_bytes,
            "block_size": self.engine.block_size,
            "max_num_batched_tokens": self.engine.config.scheduler.max_num_batched_tokens,
            "deterministic": self.engine.config.model.deterministic,
            "precision": self.engine.precision,
        }
