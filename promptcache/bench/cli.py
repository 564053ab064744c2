"""``promptcache bench``: measure prompt caching on the in-process engine or an HTTP server."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from promptcache.bench.workloads import LongDoc

EPILOG_EXAMPLES = """\
examples:
  promptcache bench --model random:smollm2-135m --dtype bfloat16 --workload prefix-pair \\
      --baseline transformers --json pair.json --plot pair.png
  promptcache bench --workload shared-prefix --url http://127.0.0.1:8000 --cold-url http://127.0.0.1:8001
  promptcache bench --workload prefix-pair --url http://127.0.0.1:8093 --peer-url http://127.0.0.1:8092 \\
      --prompt-tokens 2048 --suffix-tokens 128 --repeats 9 --no-throughput
"""


def _epilog() -> str:
    from promptcache.bench.suite import DEFAULTS

    lines = ["workload flags left unset take the workload's CPU default (shared/BENCHMARKS.md):"]
    for name, shape in DEFAULTS.items():
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in shape.items())
        lines.append(f"  {name:<14} {flags}" + (" --order tile" if name == "long-doc" else ""))
    return "\n".join(lines) + "\n\n" + EPILOG_EXAMPLES


def add_bench_parser(sub: Any) -> argparse.ArgumentParser:
    from promptcache.bench.suite import WORKLOADS
    from promptcache.engine.config import add_engine_flags

    p: argparse.ArgumentParser = sub.add_parser(
        "bench", help="benchmark prompt caching: TTFT cache on vs off, throughput, baselines",
        description="Run a workload with the prefix cache on and off (same token ids, same run), check that "
                    "greedy outputs match, and report TTFT, throughput, hit rate and memory.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_engine_flags(p)  # --no-prefix-cache is ignored: every run measures both arms
    p.add_argument("--workload", choices=WORKLOADS, default="prefix-pair")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt token ids")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the engine and the baselines (default: OMP_NUM_THREADS or all cores)")
    g = p.add_argument_group("workload shape (unset: the workload's default)")
    g.add_argument("--prompt-tokens", type=int, help="prefix-pair: P, tokens of each prompt; tenant-probe: its length")
    g.add_argument("--suffix-tokens", type=int, help="prefix-pair: S, tokens after the shared prefix")
    g.add_argument("--repeats", type=int, default=3, help="prefix-pair: repeats (medians are reported)")
    g.add_argument("--prefix-tokens", type=int, help="shared-prefix: system prompt P; multi-turn: system prompt")
    g.add_argument("--groups", type=int, help="shared-prefix: G")
    g.add_argument("--questions", type=int, help="shared-prefix: N questions per group")
    g.add_argument("--question-tokens", type=int, help="Q, tokens per question")
    g.add_argument("--output-tokens", type=int, help="O, generated tokens per request")
    g.add_argument("--users", type=int, help="multi-turn: U; multi-replica: users per tenant")
    g.add_argument("--rounds", type=int, help="multi-turn, multi-replica: R")
    g.add_argument("--documents", type=int, help="long-doc: D")
    g.add_argument("--doc-tokens", type=int, help="long-doc: L")
    g.add_argument("--asks", type=int, help="long-doc: K questions per document")
    g.add_argument("--trials", type=int, help="tenant-probe: interleaved trials")
    g.add_argument("--tenants", type=int, help="multi-replica: tenants (each with its own system prompt)")
    g.add_argument("--replicas", type=int, help="multi-replica: engine replicas on Ray Serve")
    g.add_argument("--order", choices=LongDoc.ORDERS, default="tile", help="long-doc: request order")
    t = p.add_argument_group("throughput and baselines")
    t.add_argument("--baseline", choices=["none", "transformers"], default="none",
                   help="also run Hugging Face transformers on the same weights, dtype and token ids")
    t.add_argument("--baseline-dtype", default=None,
                   help="dtype of the baseline (default: the engine's), e.g. float32 where bf16 is emulated")
    t.add_argument("--prefill-tokens", type=int, default=None,
                   help="prompt length of the cold prefill measurement (default 2048; prefix-pair: P)")
    t.add_argument("--decode-batch-sizes", type=int, nargs="+", default=[1, 8])
    t.add_argument("--decode-tokens", type=int, default=32, help="tokens generated per decode stream")
    t.add_argument("--decode-prompt-tokens", type=int, default=128)
    t.add_argument("--no-throughput", action="store_true", help="skip prefill/decode/GEMM measurements")
    t.add_argument("--deterministic-arms", action="store_true",
                   help="also run cache on and off in deterministic mode: its cost and exactness, same run")
    h = p.add_argument_group("HTTP (any OpenAI-compatible server)")
    h.add_argument("--url", help="benchmark the server at this address instead of the in-process engine")
    h.add_argument("--cold-url", help="a second server with prefix caching off: the no-cache arm")
    h.add_argument("--served-model", help="model name to send (default: the first of /v1/models)")
    h.add_argument("--api-key", help="bearer token for the server")
    h.add_argument("--peer-url", help="another OpenAI-compatible server (vLLM, llama.cpp, ...) given the same "
                   "token ids in the same run: prefix-pair alternates the two request by request; other "
                   "workloads run it as an arm after ours")
    h.add_argument("--peer-served-model", help="model name to send the peer (default: the first of its /v1/models)")
    h.add_argument("--peer-api-key", help="bearer token for the peer")
    h.add_argument("--peer-quiet-s", type=float, default=10.0, metavar="S",
                   help="with a peer, before each timed request (prefix-pair) or arm, wait up to S seconds for "
                   "this host's CPUs to go quiet: a server may poll on a core after it answers (0: never wait)")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    o.add_argument("--plot", metavar="FILE.png", help="plot TTFT per request, coloured by cached fraction")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=bench)
    return p


def bench(args: argparse.Namespace) -> int:
    from promptcache.bench.report import markdown, plot_ttft, write_json
    from promptcache.bench.suite import run_bench

    report = run_bench(args)
    sys.stdout.write(markdown(report))
    if args.json:
        write_json(report, args.json)
    if args.plot:
        plot_ttft(report, args.plot)
    return 0 if report.get("greedy_match") is not False else 1
