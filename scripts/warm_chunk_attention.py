"""Attention of one warm request's chunk (128 new tokens over 1,920 cached ones, smollm2-135m's heads,
float32 cache, slots in shuffled blocks, 8 layers' caches in turn so K/V are cold), per layer, two ways
interleaved in one process:

- ``merged``: the plan before whole chunks — the cached keys by slot with the query heads folded
  per KV head (non-causal), then the causal call over the fresh K/V, merged by log-sum-exp;
- ``whole``: one causal call over every slot of the context, the fresh ones last (``CascadePlan.whole``).

    .venv/bin/python scripts/warm_chunk_attention.py [--merged-lib OLD.so] [--whole-lib NEW.so]

Each path runs the current float32 library unless given another build (e.g. one compiled from an
earlier revision's ``promptcache/model/csrc/{flash_f32,ops_f32}.c`` with ``gcc -O3 -std=c11 -fPIC
-shared -fopenmp -mavx2 -mfma ... -lm``), so the plan's and the kernel's changes can be told apart.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from promptcache.model import native  # noqa: E402
from promptcache.model.cascade import _merge_into  # noqa: E402
from promptcache.model.native_lib import Library  # noqa: E402

H, KVH, D = 9, 3, 64
G = H // KVH


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--merged-lib", type=Path)
    ap.add_argument("--whole-lib", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=25)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    current = native.library_f32()
    if current is None and not (args.merged_lib and args.whole_lib):
        sys.exit("the float32 kernels do not run here (AVX2 and FMA needed)")
    merged_lib = Library(args.merged_lib, torch.float32) if args.merged_lib else current
    whole_lib = Library(args.whole_lib, torch.float32) if args.whole_lib else current
    assert merged_lib is not None and whole_lib is not None

    def flash(lib: Library, *a, **kw) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
        res = lib.flash(*a, **kw)
        assert res is not None, "the kernel declined the call"
        return res

    layers, slots, n, c, s = 8, 40000, 128, 1920, D**-0.5
    caches = [torch.randn(2, KVH, slots, D) for _ in range(layers)]
    blocks = torch.randperm(slots // 16)[: (c + n) // 16]
    idx = (blocks[:, None] * 16 + torch.arange(16)).reshape(1, -1).contiguous()
    cached_idx = idx[:, :c].contiguous()
    q, k, v = torch.randn(n, H, D), torch.randn(n, KVH, D), torch.randn(n, KVH, D)
    for kv in caches:  # the chunk's fresh K/V, stored before attention
        kv[0][:, idx[0, c:]] = k.transpose(0, 1)
        kv[1][:, idx[0, c:]] = v.transpose(0, 1)

    def merged(kv: torch.Tensor) -> torch.Tensor:
        qf = q.reshape(n, KVH, G, D).transpose(0, 1).contiguous()
        o, lse = flash(merged_lib, qf.reshape(1, KVH, n * G, D), kv[0], kv[1], s, False, kv_idx=cached_idx)
        acc_o, acc_l = o.view(KVH, n, G, D).clone(), lse.view(KVH, n, G).clone()
        qh = q.transpose(0, 1).unsqueeze(0).contiguous()
        o2, l2 = flash(merged_lib, qh, k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), s, True)
        _merge_into(acc_o, acc_l, o2.view(KVH, G, n, D).transpose(1, 2), l2.view(KVH, G, n).transpose(1, 2))
        return acc_o.transpose(0, 1).reshape(n, H, D)

    def whole(kv: torch.Tensor) -> torch.Tensor:
        o, _ = flash(whole_lib, q.transpose(0, 1).unsqueeze(0), kv[0], kv[1], s, True, kv_idx=idx)
        return o[0].transpose(0, 1).contiguous()

    diff = (merged(caches[0]) - whole(caches[0])).abs().max().item()
    times: dict[str, list[float]] = {"merged": [], "whole": []}
    for _ in range(args.rounds):
        for name, fn in (("merged", merged), ("whole", whole)):
            start = time.perf_counter()
            for kv in caches:
                fn(kv)
            times[name].append((time.perf_counter() - start) / layers * 1e3)
    print(f"largest difference between the two: {diff:.1e}")
    for name, ts in times.items():
        ts.sort()
        print(f"{name}: median {ts[len(ts) // 2]:.2f} ms per layer, min {ts[0]:.2f}")


if __name__ == "__main__":
    main()
