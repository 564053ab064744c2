"""Random request streams against the cache-off engine: same greedy tokens, integrity every step."""

from __future__ import annotations

import functools

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from promptcache.engine.config import EngineConfig
from promptcache.engine.llm_engine import LLMEngine
from promptcache.engine.request import RequestSpec
from promptcache.engine.sampling import SamplingParams


@functools.cache
def reference_outputs(prompt: tuple[int, ...], max_tokens: int) -> list[int]:
    """Greedy tokens of an engine with caching off (one request at a time, plenty of memory)."""
    engine = _engine(
        EngineConfig.of(model="random:tiny", dtype="float32", num_blocks=64, enable_prefix_caching=False)
    )
    engine.add_request(RequestSpec(
        "ref", list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)))
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
    assert out is not None
    return out.token_ids


@functools.cache
def _engine(config: EngineConfig) -> LLMEngine:
    return LLMEngine(config)


prefixes = [
    torch.randint(10, 4000, (96,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(3)
]


@st.composite
def request_stream(draw):
    block_size = draw(st.sampled_from([4, 8, 16]))
    # from "one request just fits" to 1.5x that: the working set usually exceeds the pool
    one_request = -(-122 // block_size)  # prompt <= 116 tokens + 6 generated
    num_blocks = one_request + draw(st.integers(min_value=0, max_value=one_request // 2))
    reqs = []
    for _ in range(draw(st.integers(min_value=3, max_value=8))):
        prefix = prefixes[draw(st.integers(0, 2))][: draw(st.integers(16, 96))]
        suffix = draw(st.lists(st.integers(10, 3999), min_size=0, max_size=20))
        max_tokens = draw(st.integers(1, 6))
        arrive = draw(st.integers(0, 3))  # step at which it is added
        reqs.append((tuple(prefix + suffix), max_tokens, arrive))
    return block_size, num_blocks, reqs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_stream())
def test_random_streams_match_cache_off_engine(stream):
    block_size, num_blocks, reqs = stream
    engine = LLMEngine(
        EngineConfig.of(
            model="random:tiny",
            dtype="float32",
            block_size=block_size,
            num_blocks=num_blocks,
            max_num_batched_tokens=max(32, block_size),
        )
    )
    results: dict[str, list[int]] = {}
    step = 0
    pending = sorted(enumerate(reqs), key=lambda x: x[1][2])
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][1][2] <= step:
            i, (prompt, max_tokens, _) = pending.pop(0)
            engine.add_request(RequestSpec(
                f"r{i}", list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)))
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.token_ids
        engine.check_integrity()
        step += 1
        assert step < 2000, "engine made no progress"
    for i, (prompt, max_tokens, _) in enumerate(reqs):
        assert results[f"r{i}"] == reference_outputs(prompt, max_tokens), f"request {i} diverged"
    stats = engine.stats()
    event(f"preempted={stats['preemptions'] > 0} evicted={stats['blocks_evicted'] > 0}")
    assert stats["blocks_in_use"] == 0
    assert stats["blocks_empty"] + stats["blocks_cached"] == stats["blocks_total"]
