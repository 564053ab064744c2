"""Linears of one forward, our bf16-panel GEMM (``linear_w16``) against oneDNN's packed float32.

The shapes of smollm2-135m (q|k|v, o, gate|up, down; 30 layers, each with weights of its own so
they come from memory as in a real forward, then the tied head for up to 128 rows) with random
bf16 values; both kernels multiply by the same values in float32 math. Rounds interleave the two;
the minimum per row count is printed, with the rate.

    .venv/bin/python scripts/linear_microbench.py [--threads 2] [--rows 1 8 32 128 512 2048]
"""

from __future__ import annotations

import argparse
import time

import torch

from promptcache.model import native
from promptcache.model.native_lib import pack_w16

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # [out, in] of one layer's linears
HEAD = (49152, 576)
LAYERS = 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128, 512, 2048])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lib = native.library_f32()
    if lib is None:
        raise SystemExit("the float32 kernels do not run on this CPU (they need AVX2 and FMA)")
    g = torch.Generator().manual_seed(0)
    weights = [[torch.randn(n, k, generator=g).to(torch.bfloat16) for n, k in SHAPES] for _ in range(LAYERS)]
    weights.append([torch.randn(*HEAD, generator=g).to(torch.bfloat16)])
    panels = [[pack_w16(w) for w in layer] for layer in weights]
    dnn = [[torch.ops.mkldnn._reorder_linear_weight(w.float()) for w in layer] for layer in weights]

    def forward(m: int, ours: bool) -> float:
        xs = {k: torch.randn(m, k, generator=g) for k in {k for _, k in [*SHAPES, HEAD]}}
        layers = range(LAYERS + 1 if m <= 128 else LAYERS)  # the head: decode-sized steps only
        start = time.perf_counter()
        for i in layers:
            for j, w in enumerate(weights[i]):
                x = xs[w.shape[1]]
                if ours:
                    lib.linear_w16(x, panels[i][j], w.shape[0], None)
                else:
                    torch.ops.mkldnn._linear_pointwise(x, dnn[i][j], None, "none", [], "")
        return time.perf_counter() - start

    print(f"threads {args.threads}; ms per forward (min of {args.rounds} interleaved rounds)")
    print(f"{'rows':>6} {'oneDNN f32':>11} {'bf16 panels':>12} {'ratio':>6}  GFLOP/s (ours)")
    for m in args.rows:
        best = {False: float("inf"), True: float("inf")}
        for _ in range(args.rounds):
            for ours in (False, True):
                best[ours] = min(best[ours], forward(m, ours))
        flop = 2 * m * (LAYERS * sum(n * k for n, k in SHAPES) + (HEAD[0] * HEAD[1] if m <= 128 else 0))
        print(f"{m:>6} {best[False] * 1e3:>11.1f} {best[True] * 1e3:>12.1f} {best[True] / best[False]:>6.2f}"
              f"  {flop / best[True] / 1e9:.0f}")


if __name__ == "__main__":
    main()
