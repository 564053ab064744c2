"""One ``promptcache bench`` run: build the arms, run the workload, add the machine's figures."""

from __future__ import annotations

import argparse
import inspect
import os
import time
from typing import Any

import torch

from promptcache.bench.backends import Backend, EngineBackend
from promptcache.bench.baselines import TransformersBaseline
from promptcache.bench.cluster_bench import MultiReplica, multi_replica_targets
from promptcache.bench.machine import (
    QuietHost,
    describe_host,
    gemm_flops_per_s,
    largest_gemm,
    peak_rss_bytes,
    prefill_flops,
)
from promptcache.bench.prefix_pair import PrefixPair, run_prefix_pair
from promptcache.bench.runner import measure_decode, measure_prefill, measure_structured_decode, run_workload
from promptcache.bench.tenant_probe import TenantProbe
from promptcache.bench.tier_bench import TierBench, tier_targets
from promptcache.bench.workloads import LongDoc, MultiTurn, SharedPrefix, TokenSource, Workload
from promptcache.engine.precision import dtype_name

WORKLOADS = ("prefix-pair", "shared-prefix", "multi-turn", "long-doc", "tenant-probe", "tier", "multi-replica")

WORKLOAD_CLASSES: dict[str, type] = {"prefix-pair": PrefixPair, "shared-prefix": SharedPrefix,
                                     "multi-turn": MultiTurn, "long-doc": LongDoc, "tenant-probe": TenantProbe,
                                     "tier": TierBench, "multi-replica": MultiReplica}


def _shape_defaults(cls: type) -> dict[str, Any]:
    """A workload's shape parameters and their defaults, read from its constructor (the one place)."""
    return {name: p.default for name, p in inspect.signature(cls).parameters.items()
            if name not in ("seed", "repeats", "order") and p.default is not inspect.Parameter.empty}


# CPU defaults of shared/BENCHMARKS.md; a flag left unset (None) takes the workload's value
DEFAULTS: dict[str, dict[str, Any]] = {name: _shape_defaults(cls) for name, cls in WORKLOAD_CLASSES.items()}


def _opt(args: argparse.Namespace, name: str) -> Any:
    value = getattr(args, name, None)
    return DEFAULTS[args.workload][name] if value is None else value


def build_workload(args: argparse.Namespace) -> Workload | PrefixPair | TenantProbe | TierBench | MultiReplica:
    w, o = args.workload, lambda name: _opt(args, name)
    if w == "multi-replica":
        return MultiReplica(o("tenants"), o("users"), o("rounds"), o("prefix_tokens"), o("question_tokens"),
                            o("output_tokens"), o("replicas"), args.seed)
    if w == "tier":
        return TierBench(o("prompt_tokens"), o("suffix_tokens"), args.repeats, args.seed)
    if w == "tenant-probe":
        return TenantProbe(o("trials"), o("prompt_tokens"), args.seed)
    if w == "prefix-pair":
        return PrefixPair(o("prompt_tokens"), o("suffix_tokens"), o("output_tokens"), args.repeats, args.seed)
    if w == "shared-prefix":
        return SharedPrefix(o("groups"), o("questions"), o("prefix_tokens"), o("question_tokens"),
                            o("output_tokens"), args.seed)
    if w == "multi-turn":
        return MultiTurn(o("users"), o("rounds"), o("prefix_tokens"), o("question_tokens"), o("output_tokens"),
                         args.seed)
    if w == "long-doc":
        return LongDoc(o("documents"), o("doc_tokens"), o("asks"), o("question_tokens"), o("output_tokens"),
                       args.order, args.seed)
    raise ValueError(f"unknown workload {w!r}; use one of {', '.join(WORKLOADS)}")


def build_arms(args: argparse.Namespace, both: bool) -> dict[str, Backend]:
    """``cache`` (and ``no-cache`` when ``both``): two engines here, or one or two servers."""
    if args.url:
        from promptcache.bench.http_client import HttpBackend

        arms: dict[str, Backend] = {"cache": HttpBackend(args.url, args.served_model, "cache", args.api_key)}
        if both and args.cold_url:
            arms["no-cache"] = HttpBackend(args.cold_url, args.served_model, "no-cache", args.api_key)
    else:
        from promptcache.engine.config import engine_config_from_args
        from promptcache.engine.llm_engine import LLMEngine

        config = engine_config_from_args(args)
        arms = {"cache": EngineBackend(LLMEngine(config.replace(enable_prefix_caching=True)), "cache")}
        if both:
            off = config.replace(enable_prefix_caching=False)
            arms["no-cache"] = EngineBackend(LLMEngine(off), "no-cache")
            if getattr(args, "deterministic_arms", False):  # the same two arms in deterministic mode
                for arm, cfg in (("det-cache", config), ("det-no-cache", off)):
                    arms[arm] = EngineBackend(LLMEngine(cfg.replace(deterministic=True)), arm)
    if getattr(args, "peer_url", None):  # another server on the same ids, same run
        from promptcache.bench.http_client import HttpBackend

        arms["peer"] = HttpBackend(args.peer_url, args.peer_served_model, "peer", args.peer_api_key)
    return arms


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    workload = build_workload(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the engine then leaves torch's count alone
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    peer_url = getattr(args, "peer_url", None)
    if not peer_url and (getattr(args, "peer_served_model", None) or getattr(args, "peer_api_key", None)):
        raise ValueError("--peer-served-model and --peer-api-key need --peer-url")
    if peer_url and getattr(args, "baseline", "none") != "none":
        raise ValueError("--peer-url gives each repeat fresh ids; --baseline transformers reuses one prefix: "
                         "run them separately")
    if peer_url and isinstance(workload, TenantProbe | TierBench | MultiReplica):
        raise ValueError(f"--peer-url: the {args.workload} workload runs in-process only; prefix-pair, "
                         "shared-prefix, multi-turn and long-doc run against a peer")
    if isinstance(workload, TenantProbe):
        return _tenant_probe(args, workload)
    if isinstance(workload, TierBench):
        return _tier(args, workload)
    if isinstance(workload, MultiReplica):
        return _multi_replica(args, workload, progress)
    arms = build_arms(args, both=not isinstance(workload, PrefixPair))
    reference = arms.get("no-cache", arms["cache"])
    baseline = _baseline(args, reference)
    started = time.time()
    quiet_s = getattr(args, "peer_quiet_s", 10.0)
    settle = QuietHost(quiet_s) if "peer" in arms and quiet_s > 0 else None
    if isinstance(workload, PrefixPair):
        report = run_prefix_pair(workload, arms["cache"], baseline, progress, peer=arms.get("peer"), settle=settle)
    else:
        report = run_workload(workload, arms, progress, settle=settle)
    if settle is not None:
        report["quiet_wait_timeouts"] = settle.timeouts
    report["engine"] = arms["cache"].describe()
    report["backends"] = {arm: backend.describe() for arm, backend in arms.items()}
    report["host"] = describe_host()
    report["started_unix_s"] = started
    if not args.no_throughput:
        _throughput(args, report, workload, reference)
    if baseline is not None:
        report.setdefault("transformers", baseline.describe())
        if not args.no_throughput:
            for batch in args.decode_batch_sizes:
                src = TokenSource(args.seed + 30_001 + batch)
                prompts = [src.take(args.decode_prompt_tokens) for _ in range(batch)]
                report[f"transformers_decode_tokens_per_s_b{batch}"] = baseline.decode_tokens_per_s(
                    prompts, args.decode_tokens
                )
    if args.url is None:
        report["peak_rss_bytes"] = peak_rss_bytes()
    report["targets"] = targets(report)
    return report


def _tenant_probe(args: argparse.Namespace, workload: TenantProbe) -> dict[str, Any]:
    if args.url:
        raise ValueError("tenant-probe times prefill inside the engine: it runs in-process only (no --url)")
    from promptcache.engine.config import engine_config_from_args
    from promptcache.engine.llm_engine import LLMEngine

    engine = LLMEngine(engine_config_from_args(args).replace(enable_prefix_caching=True))
    result = workload.run(engine)
    return {"workload": "tenant-probe", "params": workload.params(), "tenant_probe": result.summary(),
            "engine": EngineBackend(engine, "cache").describe(), "host": describe_host(), "targets": []}


def _tier(args: argparse.Namespace, workload: TierBench) -> dict[str, Any]:
    if args.url:
        raise ValueError("the tier workload restarts and empties engines' memory: it runs in-process only (no --url)")
    from promptcache.engine.config import engine_config_from_args

    result = workload.run(engine_config_from_args(args))
    return {"workload": "tier", "params": workload.params(), "tier": result, "engine": result.pop("engine"),
            "host": describe_host(), "targets": tier_targets(result)}


def _multi_replica(args: argparse.Namespace, workload: MultiReplica, progress: bool) -> dict[str, Any]:
    if args.url:
        raise ValueError("multi-replica starts its own replicas on Ray Serve, a deployment per routing mode "
                         "(no --url)")
    from promptcache.engine.config import engine_config_from_args

    cpus = args.threads or os.cpu_count() or 1
    result = workload.run(engine_config_from_args(args).replace(enable_prefix_caching=True), cpus, progress)
    return {"workload": "multi-replica", "params": workload.params(), "multi_replica": result,
            "host": describe_host(), "targets": multi_replica_targets(result)}


def _throughput(args: argparse.Namespace, report: dict[str, Any], workload: Workload | PrefixPair,
                backend: Backend) -> None:
    """Cold prefill tokens/s (prefix-pair: its cold TTFT), decode tokens/s, GEMM FLOP/s and MFU."""
    if isinstance(workload, PrefixPair):
        num_tokens, prefill_s = workload.prompt_tokens, report["cold_ttft_s"]
    else:
        num_tokens = args.prefill_tokens or DEFAULTS["prefix-pair"]["prompt_tokens"]
        prefill = measure_prefill(backend, num_tokens, args.seed + 20_000)
        report.update(prefill)
        prefill_s = prefill["prefill_s"]
    for batch in args.decode_batch_sizes:
        report[f"decode_tokens_per_s_b{batch}"] = measure_decode(
            backend, batch, args.decode_prompt_tokens, args.decode_tokens, args.seed + 30_000 + batch
        )
    if isinstance(backend, EngineBackend):
        report.update(measure_structured_decode(backend.engine, args.decode_prompt_tokens, args.decode_tokens,
                                                args.seed + 40_000))
        runner = backend.engine.runner
        report["kv_bytes_per_token"] = runner.kv_bytes_per_token
        shape = largest_gemm(runner.loaded.arch, num_tokens)
        report["gemm_shape"] = list(shape)
        # the machine's GEMM rate is its best dtype's: where bf16 is emulated, fp32 is far faster
        rates = {dtype_name(dt): gemm_flops_per_s(*shape, dtype=dt)
                 for dt in dict.fromkeys([runner.dtype, torch.float32])}
        report["gemm_flops_per_s_by_dtype"] = rates
        report["gemm_flops_per_s"] = max(rates.values())
        report["prefill_flops"] = prefill_flops(runner.loaded.arch, num_tokens)
        report["mfu"] = report["prefill_flops"] / prefill_s / report["gemm_flops_per_s"]
        if isinstance(workload, PrefixPair):  # the warm path's floor: its suffix attends over P tokens
            arch, s = runner.loaded.arch, workload.suffix_tokens
            warm = prefill_flops(arch, s, workload.shared_tokens)
            report["warm_flops_over_suffix_only_flops"] = warm / prefill_flops(arch, s)
            report["warm_over_suffix_only_vs_floor"] = (report["warm_over_suffix_only"]
                                                        / report["warm_flops_over_suffix_only_flops"])


def _baseline(args: argparse.Namespace, reference: Backend) -> TransformersBaseline | None:
    """transformers on the engine's checkpoint, in the engine's dtype unless --baseline-dtype says."""
    if args.baseline != "transformers":
        return None
    if not isinstance(reference, EngineBackend):
        raise ValueError("--baseline transformers runs in process; it cannot be combined with --url")
    from promptcache.engine.precision import pick_dtype

    runner = reference.engine.runner
    dtype = runner.dtype if args.baseline_dtype is None else pick_dtype(args.baseline_dtype, runner.device)
    return TransformersBaseline(runner.model_dir, dtype)


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, as ratios measured in this run (value <= limit is met)."""
    checks = [
        ("warm TTFT / suffix-only TTFT", "warm_over_suffix_only", 1.25),
        ("cold TTFT / transformers cold TTFT", "cold_over_transformers_cold", 0.75),
        ("warm TTFT / transformers warm TTFT", "warm_over_transformers_warm", 0.5),
        # issue 10's: the warm path within 10 % of its FLOP floor, and against vLLM (any peer: --peer-url)
        ("warm / suffix-only TTFT over its FLOP floor", "warm_over_suffix_only_vs_floor", 1.1),
        ("warm TTFT / the peer's warm TTFT", "warm_over_peer_warm", 0.6),
        ("total time / the peer's total time", "total_over_peer", 0.75),
        ("TTFT p50 / the peer's TTFT p50", "ttft_p50_over_peer", 0.75),
    ]
    out = []
    for name, key, limit in checks:
        if report.get(key) is not None:
            out.append({"name": name, "value": report[key], "limit": limit, "met": report[key] <= limit})
    if report.get("workload") == "shared-prefix" and report.get("speedup_total"):
        value = 1.0 / report["speedup_total"]
        out.append({"name": "cache total time / no-cache total time", "value": value, "limit": 0.2,
                    "met": value <= 0.2})
    return out
