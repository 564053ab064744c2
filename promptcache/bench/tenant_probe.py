"""Can one tenant learn by timing that another tenant sent a prompt? (``--workload tenant-probe``)

A cache shared across tenants leaks: a prompt someone else sent answers faster. Each trial here
draws a new prompt P and a fresh prompt F of the same length; the owner tenant sends P (it is now
cached in the owner's namespace); then, in a random order, the other tenant sends P, the other
tenant sends F, and the owner sends P again. The time to first token of each is measured in the
engine (prefill only, no HTTP noise). Two-sided Mann-Whitney rank tests compare the other tenant's
P against F (must be indistinguishable) and the owner's repeat against F (must be faster: the probe
can see a hit when there is one).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass, field

from promptcache.engine.llm_engine import LLMEngine
from promptcache.engine.request import RequestSpec
from promptcache.engine.sampling import SamplingParams

OWNER, OTHER = "probe-owner", "probe-other"


@dataclass
class ProbeResult:
    trials: int
    prompt_tokens: int
    owner_s: list[float] = field(default_factory=list)  # the owner's repeat of its own prompt: a hit
    other_s: list[float] = field(default_factory=list)  # another tenant, the owner's prompt
    fresh_s: list[float] = field(default_factory=list)  # another tenant, a prompt nobody sent
    other_cached_tokens: int = 0  # summed over trials: must be 0
    p_other_vs_fresh: float = 1.0
    p_owner_vs_fresh: float = 1.0

    def summary(self) -> dict[str, float | int]:
        def ms(xs: list[float]) -> float:
            return round(1000 * statistics.median(xs), 2)

        return {"trials": self.trials, "prompt_tokens": self.prompt_tokens,
                "median_ttft_ms_other_tenant_cached_prompt": ms(self.other_s),
                "median_ttft_ms_fresh_prompt": ms(self.fresh_s),
                "median_ttft_ms_owner_hit": ms(self.owner_s),
                "p_other_vs_fresh": round(self.p_other_vs_fresh, 4),
                "p_owner_vs_fresh": float(f"{self.p_owner_vs_fresh:.3g}"),
                "other_tenant_cached_tokens": self.other_cached_tokens}


def mann_whitney_p(xs: list[float], ys: list[float]) -> float:
    """Two-sided p of the Mann-Whitney U test (normal approximation with tie correction)."""
    pooled = sorted((v, i) for i, v in enumerate(xs + ys))
    ranks = [0.0] * len(pooled)
    ties = 0.0
    i = 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[pooled[k][1]] = (i + j) / 2 + 1
        ties += (j - i + 1) ** 3 - (j - i + 1)
        i = j + 1
    n1, n2 = len(xs), len(ys)
    u = sum(ranks[:n1]) - n1 * (n1 + 1) / 2
    n = n1 + n2
    var = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    if var <= 0:
        return 1.0
    z = (abs(u - n1 * n2 / 2) - 0.5) / math.sqrt(var)  # continuity correction
    return max(0.0, min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2))))


def _ttft(engine: LLMEngine, rid: str, prompt: list[int], tenant: str) -> tuple[float, int]:
    started = time.perf_counter()
    engine.add_request(RequestSpec(rid, prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                                   tenant))
    while True:
        for out in engine.step():
            if out.request_id == rid and out.token_ids:
                elapsed = time.perf_counter() - started
                while engine.has_unfinished_requests():
                    engine.step()
                return elapsed, out.usage.cached_tokens


class TenantProbe:
    """The ``tenant-probe`` workload (in-process only: it times prefill inside the engine)."""

    def __init__(self, trials: int = 40, prompt_tokens: int = 1024, seed: int = 0) -> None:
        self.trials, self.prompt_tokens, self.seed = trials, prompt_tokens, seed

    def params(self) -> dict[str, int]:
        return {"trials": self.trials, "prompt_tokens": self.prompt_tokens, "seed": self.seed}

    def run(self, engine: LLMEngine) -> ProbeResult:
        return probe_tenant_timing(engine, self.trials, self.prompt_tokens, self.seed)


def probe_tenant_timing(engine: LLMEngine, trials: int = 40, prompt_tokens: int = 1024, seed: int = 0,
                        warmup: int = 3) -> ProbeResult:
    rng = random.Random(seed)
    vocab = engine.runner.loaded.arch.vocab_size
    result = ProbeResult(trials, prompt_tokens)

    def draw() -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(prompt_tokens)]

    for w in range(warmup):  # first calls pay for allocations and kernel selection
        _ttft(engine, f"warm-{w}", draw(), OTHER)
    for t in range(trials):
        target, fresh = draw(), draw()
        _ttft(engine, f"own-{t}", target, OWNER)
        arms = [("other", target, OTHER), ("fresh", fresh, OTHER), ("owner", target, OWNER)]
        rng.shuffle(arms)
        for name, prompt, tenant in arms:
            elapsed, cached = _ttft(engine, f"{name}-{t}", prompt, tenant)
            {"other": result.other_s, "fresh": result.fresh_s, "owner": result.owner_s}[name].append(elapsed)
            if name == "other":
                result.other_cached_tokens += cached
    result.p_other_vs_fresh = mann_whitney_p(result.other_s, result.fresh_s)
    result.p_owner_vs_fresh = mann_whitney_p(result.owner_s, result.fresh_s)
    return result
