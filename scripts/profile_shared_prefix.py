"""Profile the in-process ``shared-prefix`` workload on the main thread: wall time, TTFT p50, time per
step shape (tokens, sequences), and optionally the torch profiler's op table or cProfile.

    .venv/bin/python scripts/profile_shared_prefix.py --model /tmp/smollm2 [--torch | --cprofile]

(``promptcache make-model --shape smollm2-135m --out /tmp/smollm2 --dtype bfloat16`` writes the
checkpoint the benchmarks use.)
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from promptcache.bench.backends import EngineBackend  # noqa: E402
from promptcache.bench.workloads import BenchRequest, SharedPrefix  # noqa: E402
from promptcache.engine.config import EngineConfig, ModelConfig  # noqa: E402
from promptcache.engine.llm_engine import LLMEngine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--torch", action="store_true", help="print the torch profiler's op table")
    mode.add_argument("--cprofile", action="store_true", help="print cProfile's functions by own time")
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=args.model, dtype=args.dtype)))
    print(engine.precision)
    backend = EngineBackend(engine, "profile")
    backend.run_wave([BenchRequest("warm-up", list(range(10, 300)), 4)])
    engine.reset_prefix_cache()
    steps: list[tuple[int, int, float]] = []
    execute = engine.runner.execute

    def timed(seqs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = execute(seqs)
        steps.append((sum(len(s.token_ids) for s in seqs), len(seqs), time.perf_counter() - start))
        return out

    engine.runner.execute = timed  # type: ignore[method-assign]
    profiler = None
    if args.torch:
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU])
        profiler.__enter__()
    py = cProfile.Profile() if args.cprofile else None
    if py is not None:
        py.enable()
    start = time.perf_counter()
    results = backend.run_wave(SharedPrefix().wave(0, {}))
    total = time.perf_counter() - start
    if py is not None:
        py.disable()
        pstats.Stats(py).sort_stats("tottime").print_stats(30)
    if profiler is not None:
        profiler.__exit__(None, None, None)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    ttfts = sorted(r.ttft_s for r in results)
    print(f"total {total:.2f} s, TTFT p50 {ttfts[len(ttfts) // 2]:.2f} s, {len(steps)} steps")
    by_shape: collections.Counter[tuple[int, int]] = collections.Counter()
    for tokens, seqs, seconds in steps:
        by_shape[(tokens, seqs)] += seconds
    print("| step tokens | sequences | seconds (all such steps) |\n| ---: | ---: | ---: |")
    for (tokens, seqs), seconds in by_shape.most_common(12):
        print(f"| {tokens} | {seqs} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
