"""Tenants never share cached K/V: 10,000 random requests from 3 tenants over the same prompts.

Every request's ``cached_tokens`` is checked against an exact oracle built from *its own tenant's*
history alone: at least the whole blocks an earlier wave of that tenant left in the cache, at most
that plus what same-wave requests of that tenant could share in flight. A hit across tenants would
exceed the upper bound; a lost own-tenant hit would fall below the lower one. The pool is large
enough that nothing is evicted (asserted), so the oracle is exact.

The timing side (another tenant's cached prompt is no faster than a fresh one) is
``test_timing_probe`` below and the ``tenant-probe`` benchmark.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter

from promptcache.bench.tenant_probe import mann_whitney_p, probe_tenant_timing
from promptcache.engine.config import EngineConfig
from promptcache.engine.llm_engine import LLMEngine
from promptcache.engine.request import RequestSpec
from promptcache.engine.sampling import SamplingParams

TENANTS = ("acme", "globex", "initech")
BLOCK = 16
NUM_REQUESTS = 10_000
WAVE = 50


def _engine(num_blocks: int) -> LLMEngine:
    return LLMEngine(EngineConfig.of(model="random:tiny", dtype="float32", device="cpu", num_blocks=num_blocks,
                                  max_model_len=512, max_num_batched_tokens=4096, block_size=BLOCK))


def _block_keys(prompt: list[int]) -> list[tuple[int, ...]]:
    """The prompt's whole-block prefixes that can be reused: the last token always runs."""
    usable = (len(prompt) - 1) // BLOCK
    return [tuple(prompt[: (k + 1) * BLOCK]) for k in range(usable)]


def _reusable(keys: list[tuple[int, ...]], seen: set[tuple[int, ...]]) -> int:
    n = 0
    while n < len(keys) and keys[n] in seen:
        n += 1
    return n * BLOCK


def test_ten_thousand_requests_never_hit_across_tenants() -> None:
    rng = random.Random(13)
    # many prefixes, so a tenant often sends one that only other tenants have sent so far
    prefixes = [[rng.randrange(10, 4000) for _ in range(128)] for _ in range(300)]
    suffixes = [[rng.randrange(10, 4000) for _ in range(rng.randint(3, 24))] for _ in range(20)]
    engine = _engine(num_blocks=18_000)  # > 300 x 8 x 3 prefix blocks + one suffix block per request
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    seen: dict[str, set[tuple[int, ...]]] = {t: set() for t in TENANTS}  # blocks of earlier waves
    cached_total = cross_possible = 0
    for w in range(NUM_REQUESTS // WAVE):
        wave = []
        for i in range(WAVE):
            tenant = rng.choice(TENANTS)
            prompt = rng.choice(prefixes)[: BLOCK * rng.randint(1, 8)] + rng.choice(suffixes)
            wave.append((f"w{w}-{i}", tenant, prompt))
            engine.add_request(RequestSpec(f"w{w}-{i}", prompt, params, tenant))
        usage = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    usage[out.request_id] = out.usage
        in_wave: dict[str, Counter[tuple[int, ...]]] = {t: Counter() for t in TENANTS}
        for _, tenant, prompt in wave:
            in_wave[tenant].update(_block_keys(prompt))  # a prompt's keys are distinct (one per length)
        for rid, tenant, prompt in wave:
            keys = _block_keys(prompt)
            lower = _reusable(keys, seen[tenant])
            shared_in_flight = {k for k in keys if in_wave[tenant][k] > 1}  # another request of the tenant has it
            upper = _reusable(keys, seen[tenant] | shared_in_flight)
            others = max(_reusable(keys, seen[t]) for t in TENANTS if t != tenant)
            cross_possible += others > upper  # another tenant holds more of this prompt than its own
            cached = usage[rid].cached_tokens
            assert lower <= cached <= upper, (rid, tenant, lower, cached, upper, others)
            cached_total += cached
        for _, tenant, prompt in wave:
            seen[tenant].update(_block_keys(prompt))
    stats = engine.stats()
    assert stats["blocks_evicted"] == 0 and stats["blocks_in_use"] == 0, stats  # the oracle stayed exact
    engine.check_integrity()
    assert cached_total > 0 and cross_possible > 500, (cached_total, cross_possible)  # the test had teeth


def test_timing_probe() -> None:
    """Another tenant's TTFT on a prompt one tenant cached is that of a fresh prompt (a rank test
    cannot tell them apart), while the owner's own hit is clearly faster (the probe has power)."""
    result = probe_tenant_timing(_engine(num_blocks=2048), trials=24, prompt_tokens=480, seed=5)
    assert result.p_owner_vs_fresh < 1e-4, result  # the owner's hit is measurably faster
    assert result.p_other_vs_fresh > 1e-3, result  # another tenant learns nothing from timing
    assert statistics.median(result.owner_s) < statistics.median(result.fresh_s)
    assert result.other_cached_tokens == 0
    # the rank test itself: U = 0 for 3 vs 3, z = 4 / sqrt(5.25) (normal approximation, continuity corrected)
    assert abs(mann_whitney_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) - 0.0809) < 1e-3
    assert mann_whitney_p([1.0, 2.0], [1.0, 2.0]) == 1.0
