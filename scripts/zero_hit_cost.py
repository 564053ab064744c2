"""What the prefix cache costs when nothing hits: 16 distinct 576-token prompts through an engine
with the cache on and one with it off, in one process, the arms alternating (``promptcache bench``
runs the cache arm first in a fresh process, and a process's first arm pays first-use costs:
oneDNN kernels for new row counts, fresh pages).

    .venv/bin/python scripts/zero_hit_cost.py --model /tmp/smollm2 [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from promptcache.bench.backends import EngineBackend  # noqa: E402
from promptcache.bench.runner import run_workload  # noqa: E402
from promptcache.bench.workloads import SharedPrefix  # noqa: E402
from promptcache.engine.config import EngineConfig, ModelConfig  # noqa: E402
from promptcache.engine.llm_engine import LLMEngine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="pairs of runs, each order once per round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = EngineConfig(model=ModelConfig(model=args.model, dtype=args.dtype))
    arms = {"cache": EngineBackend(LLMEngine(cfg.replace(enable_prefix_caching=True)), "cache"),
            "no-cache": EngineBackend(LLMEngine(cfg.replace(enable_prefix_caching=False)), "no-cache")}
    workload = SharedPrefix(groups=16, questions=1, prefix_tokens=512)
    totals: dict[str, list[float]] = {"cache": [], "no-cache": []}
    for _ in range(args.rounds):
        for order in (("no-cache", "cache"), ("cache", "no-cache")):
            report = run_workload(workload, {arm: arms[arm] for arm in order}, progress=False)
            for arm in order:
                totals[arm].append(report["arms"][arm]["total_s"])
            print(" then ".join(f"{arm} {report['arms'][arm]['total_s']:.2f} s" for arm in order))
    on, off = sum(totals["cache"]), sum(totals["no-cache"])
    print(f"cache on / off, total time: {on / off:.3f}x")


if __name__ == "__main__":
    main()
