"""Builds of the float32 library (``promptcache/model/csrc/{flash_f32,ops_f32}.c`` compiled with
``gcc -O3 -std=c11 -fPIC -shared -fopenmp -mavx2 -mfma flash_f32.c ops_f32.c -o X.so -lm``, e.g. one
per variant of a kernel) against each other in one process, calls interleaved build by build:

- ``attention``: a warm request's chunk as one causal call (128 new tokens after 1,920 cached,
  smollm2-135m's heads, slots in shuffled blocks, 8 layers' caches in turn so K/V come cold);
- ``linear``: ``linear_w16`` on smollm2-135m's four shapes at ``--rows`` rows, a fresh output per
  call (as a step gets).

Prints each build's median and minimum per call, and the largest difference from the first build.

    .venv/bin/python scripts/compare_f32_builds.py A.so B.so [...] [--what attention|linear] [--rows 128]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from promptcache.model.native_lib import Library, pack_w16

H, KVH, D = 9, 3, 64
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # [out, in]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("libs", type=Path, nargs="+")
    ap.add_argument("--what", choices=["attention", "linear"], default="attention")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    libs = [Library(p, torch.float32) for p in args.libs]
    calls = []
    if args.what == "attention":
        slots, n, c = 40000, 128, 1920
        caches = [torch.randn(2, KVH, slots, D) for _ in range(8)]
        blocks = torch.randperm(slots // 16)[: (c + n) // 16]
        idx = (blocks[:, None] * 16 + torch.arange(16)).reshape(1, -1).contiguous()
        q = torch.randn(1, H, n, D)
        for kv in caches:
            calls.append(lambda lib, kv=kv: lib.flash(q, kv[0], kv[1], D**-0.5, True, kv_idx=idx)[0])
    else:
        x = {k: torch.randn(args.rows, k) for _, k in SHAPES}
        for out, k in SHAPES:
            panels = pack_w16(torch.randn(out, k).to(torch.bfloat16))
            calls.append(lambda lib, out=out, k=k, panels=panels: lib.linear_w16(x[k], panels, out, None))
    reference = [call(libs[0]) for call in calls]
    times: list[list[float]] = [[] for _ in libs]
    diff = [0.0 for _ in libs]
    for r in range(args.rounds):
        order = range(len(libs)) if r % 2 == 0 else reversed(range(len(libs)))
        for i in order:
            start = time.perf_counter()
            outs = [call(libs[i]) for call in calls]
            times[i].append((time.perf_counter() - start) / len(calls) * 1e3)
            if r == 0:
                diff[i] = max((o - ref).abs().max().item() for o, ref in zip(outs, reference, strict=True))
    for path, ts, d in zip(args.libs, times, diff, strict=True):
        print(f"{path}: median {statistics.median(ts):.3f} ms per call, min {min(ts):.3f}; largest difference {d:.1e}")


if __name__ == "__main__":
    main()
