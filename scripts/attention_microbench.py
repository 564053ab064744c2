"""Per-layer cost of a prefill chunk over a cached context: in place (``paged_attention`` on CPU)
vs the whole-context gather it replaced, on this machine, with their largest difference.

    .venv/bin/python scripts/attention_microbench.py [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from promptcache.model import attention as A  # noqa: E402

H, KVH, D = 9, 3, 64  # smollm2-135m's heads


def timed(fn, *args, repeats: int = 20) -> tuple[float, torch.Tensor]:  # type: ignore[no-untyped-def]
    for _ in range(3):
        fn(*args)
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    return (time.perf_counter() - t) / repeats * 1000, out


def in_place(q, k, v, kv, attn, runs, slots) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return A.paged_attention(q, k, v, kv, attn, D**-0.5)


def gather(q, k, v, kv, attn, runs, slots) -> torch.Tensor:  # type: ignore[no-untyped-def]
    A.write_kv(kv, k, v, slots)
    kc, vc = A._gather(kv, runs, q.dtype)
    return A._attend_contiguous(q, kc, vc, D**-0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    torch.set_num_threads(ap.parse_args().threads)
    print("| dtype | cached | chunk | context runs | in place (ms) | gather (ms) | max diff |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for dt in (torch.bfloat16, torch.float32):
        kv = torch.randn(2, KVH, 4096, D).to(dt)
        for cached, n in ((1920, 128), (1920, 512), (512, 128)):
            q, k, v = torch.randn(n, H, D).to(dt), torch.randn(n, KVH, D).to(dt), torch.randn(n, KVH, D).to(dt)
            for name, runs in (("one", [(0, cached + n)]), ("two", [(0, cached), (2048, n)])):
                slots = torch.tensor([s for start, length in runs for s in range(start, start + length)][cached:])
                attn = A.AttentionMetadata(slots, [0, n], [cached + n], [runs])
                new_ms, new = timed(in_place, q, k, v, kv, attn, runs, slots)
                old_ms, old = timed(gather, q, k, v, kv, attn, runs, slots)
                diff = (new.float() - old.float()).abs().max().item()
                print(f"| {str(dt).removeprefix('torch.')} | {cached} | {n} | {name} | {new_ms:.2f} | {old_ms:.2f} "
                      f"| {diff:.1e} |")


if __name__ == "__main__":
    main()
