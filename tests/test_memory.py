"""Memory is bounded by what is live, not by how much was served.

The RSS growth of issue 13 (343 -> 1,843 MB over two 3-minute soaks, never given back) was oneDNN
and ideep keeping JIT-compiled kernels for up to 1,024 matrix shapes each: a 16-bit matmul on a
CPU with native bf16 goes through them, and continuous batching gives nearly every step a new
token count. ``import promptcache`` bounds both caches (``CPU_KERNEL_CACHE_ENTRIES``). Checked in a
fresh process, since the bounds only apply if set before oneDNN first runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import promptcache

PROBE = """
import json, os, sys
import promptcache, psutil, torch
torch.set_num_threads(1)
weights = [torch.randn(n, 576, dtype=torch.bfloat16) for n in (576, 192, 1536)]  # smollm2-135m's shapes
rss = lambda: psutil.Process().memory_info().rss / 2**20
torch.nn.functional.linear(torch.randn(3, 576, dtype=torch.bfloat16), weights[0])
before = rss()
for m in range(1, 301):  # 300 batch shapes x 3 weight shapes
    x = torch.randn(m, 576, dtype=torch.bfloat16)
    for w in weights:
        torch.nn.functional.linear(x, w)
print(json.dumps({"growth_mb": rss() - before, "caps": [os.environ[k] for k in
                  ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")]}))
"""


def _probe(**env: str) -> dict[str, float]:
    base = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
                         timeout=300, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_cpu_kernel_caches_are_bounded() -> None:
    bounded = _probe()
    assert bounded["caps"] == [str(promptcache.CPU_KERNEL_CACHE_ENTRIES)] * 2
    # 64 + 64 entries of at most ~1 MB; 900 shapes with the libraries' defaults took 530 MB here
    # (a 2-core EPYC with avx512_bf16) — where bf16 matmuls do not use oneDNN there is no growth
    assert bounded["growth_mb"] < 150, bounded
    chosen = _probe(ONEDNN_PRIMITIVE_CACHE_CAPACITY="5", LRU_CACHE_CAPACITY="5")
    assert chosen["caps"] == ["5", "5"]  # a user's own setting is kept
