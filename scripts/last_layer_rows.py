"""The last layer for the sampling rows only (``attention.OutputRows``) against every row, in one
process, on one engine: ``ModelRunner.last_layer_rows_only`` toggled pair by pair (the order
alternating), each pair a cold request (a fresh 1,920-token prefix + 128) and a warm one (the same
prefix + 128 new tokens), ``max_tokens=1``. Prints the medians and each pair's ratios.

    .venv/bin/python scripts/last_layer_rows.py --model /tmp/smollm2 [--pairs 30] [--threads 2]

(``/tmp/smollm2``: ``promptcache make-model --shape smollm2-135m --out /tmp/smollm2 --dtype bfloat16``.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from promptcache import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefix", type=int, default=1920)
    ap.add_argument("--suffix", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, max_num_batched_tokens=args.prefix + args.suffix, kv_cache_memory="2GiB")
    runner = llm.engine.runner
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(7)

    def ids(n: int) -> list[int]:
        return torch.randint(100, 1000, (n,), generator=gen).tolist()

    for flag in (True, False):  # a first call per shape pays for allocations: not timed
        runner.last_layer_rows_only = flag
        prefix = ids(args.prefix)
        llm.generate([prefix + ids(args.suffix)], params)
        llm.generate([prefix + ids(args.suffix)], params)
    times: dict[bool, dict[str, list[float]]] = {flag: {"cold": [], "warm": []} for flag in (True, False)}
    for pair in range(args.pairs):
        for flag in (True, False) if pair % 2 == 0 else (False, True):
            runner.last_layer_rows_only = flag
            prefix = ids(args.prefix)
            for kind in ("cold", "warm"):
                start = time.perf_counter()
                out = llm.generate([prefix + ids(args.suffix)], params)[0]
                times[flag][kind].append(time.perf_counter() - start)
            assert out.usage.cached_tokens >= args.prefix - 16, "the warm request missed the cache"
    for flag, label in ((False, "every row"), (True, "rows only")):
        print(f"{label}: " + ", ".join(f"{k} {statistics.median(v):.3f} s" for k, v in times[flag].items()))
    for kind in ("cold", "warm"):
        ratios = [a / b for a, b in zip(times[True][kind], times[False][kind], strict=True)]
        print(f"{kind}, rows only / every row, each pair: " + ", ".join(f"{r:.2f}" for r in ratios)
              + f" (median {statistics.median(ratios):.3f})")


if __name__ == "__main__":
    main()
