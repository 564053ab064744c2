"""Deterministic mode's cost on a bf16 checkpoint in float32 math: bf16-panel linears vs 32-row tiles.

Run it twice, once per linear kernel, and compare (interleave runs on a noisy machine):

    PROMPTCACHE_CPU_KERNELS=native .venv/bin/python scripts/deterministic_linears_bench.py [MODEL]
    PROMPTCACHE_CPU_KERNELS=torch  .venv/bin/python scripts/deterministic_linears_bench.py [MODEL]

(``torch`` turns our float32 kernels off: deterministic mode's linears go back to row tiles.)
MODEL: a bf16 checkpoint directory (default /tmp/smollm2, from ``promptcache make-model --shape
smollm2-135m --out /tmp/smollm2 --dtype bfloat16``).
"""

from __future__ import annotations

import random
import sys
import time

import torch

from promptcache import LLM, SamplingParams


def main() -> None:
    torch.set_num_threads(2)
    model = sys.argv[1] if len(sys.argv) > 1 else "/tmp/smollm2"
    llm = LLM(model, dtype="bfloat16", compute_dtype="float32", deterministic=True, enable_prefix_caching=False)
    rng = random.Random(0)

    def ids(n: int) -> list[int]:
        return [rng.randrange(100, 40000) for _ in range(n)]

    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate([ids(16)], one)
    start = time.perf_counter()
    llm.generate([ids(1024)], one)
    prefill = time.perf_counter() - start

    def step(batch: int) -> float:
        """Seconds per decode step of ``batch`` sequences (17 tokens minus 1, prefill subtracted)."""
        start = time.perf_counter()
        llm.generate([ids(32) for _ in range(batch)], one)
        first = time.perf_counter() - start
        start = time.perf_counter()
        llm.generate([ids(32) for _ in range(batch)], SamplingParams(max_tokens=17, temperature=0.0, ignore_eos=True))
        return (time.perf_counter() - start - first) / 16

    print({"linears": llm.engine.namespace.linears or "row tiles", "prefill 1024 s": round(prefill, 3),
           "b1 ms/step": round(step(1) * 1e3, 1), "b8 ms/step": round(step(8) * 1e3, 1)})


if __name__ == "__main__":
    main()
