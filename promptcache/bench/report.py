"""Turn a benchmark report (a plain dict) into a Markdown table, a JSON file and a PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# (key in the report, label, format); rows appear only for keys the report has
FIGURES: list[tuple[str, str, str]] = [
    ("speedup_total", "total time, no-cache / cache", "{:.2f}x"),
    ("speedup_ttft_p50", "TTFT p50, no-cache / cache", "{:.2f}x"),
    ("warm_over_suffix_only", "warm / suffix-only TTFT (ideal 1.0)", "{:.3f}"),
    ("warm_flops_over_suffix_only_flops", "warm / suffix-only FLOPs (attention floor)", "{:.3f}"),
    ("warm_over_suffix_only_vs_floor", "warm / suffix-only TTFT over that floor (ideal 1.0)", "{:.3f}"),
    ("warm_over_cold", "warm / cold TTFT", "{:.3f}"),
    ("cold_over_transformers_cold", "cold / transformers cold TTFT", "{:.3f}"),
    ("warm_over_transformers_warm", "warm / transformers warm TTFT", "{:.3f}"),
    ("transformers_cache_copy_s", "transformers DynamicCache copy (untimed), s", "{:.4f}"),
    ("cold_over_peer_cold", "cold / the peer's cold TTFT", "{:.3f}"),
    ("warm_over_peer_warm", "warm / the peer's warm TTFT", "{:.3f}"),
    ("warm_over_peer_warm_per_repeat", "warm / the peer's warm TTFT, each repeat", "ratios"),
    ("suffix_only_over_peer_suffix_only", "suffix-only / the peer's suffix-only TTFT", "{:.3f}"),
    ("total_over_peer", "total time / the peer's", "{:.3f}"),
    ("ttft_p50_over_peer", "TTFT p50 / the peer's", "{:.3f}"),
    ("peer_greedy_agree_fraction", "requests whose greedy outputs agree with the peer's", "{:.1%}"),
    ("cached_tokens", "cached tokens (warm)", "{}"),
    ("greedy_match", "greedy outputs cache on == off", "{}"),
    ("greedy_agree_fraction", "requests whose greedy outputs agree, cache on vs off", "{:.1%}"),
    ("max_logprob_diff", "largest |logprob difference|, cache on vs off", "{:.2e}"),
    ("prefill_tokens_per_s", "prefill, cold (tokens/s)", "{:.1f}"),
    ("decode_tokens_per_s_b1", "decode, batch 1 (tokens/s)", "{:.1f}"),
    ("decode_tokens_per_s_b8", "decode, batch 8 (tokens/s)", "{:.1f}"),
    ("transformers_decode_tokens_per_s_b1", "transformers decode, batch 1 (tokens/s)", "{:.1f}"),
    ("transformers_decode_tokens_per_s_b8", "transformers decode, batch 8 (tokens/s)", "{:.1f}"),
    ("decode_tokens_per_s_free_b4", "decode, 4 sampled streams (tokens/s)", "{:.1f}"),
    ("decode_tokens_per_s_json_schema_b4", "decode, the same under a JSON schema (tokens/s)", "{:.1f}"),
    ("json_schema_decode_cost", "constrained decoding cost, free / json_schema tokens/s", "{:.2f}x"),
    ("kv_bytes_per_token", "KV bytes per token", "{:,}"),
    ("peak_rss_bytes", "peak RSS (MiB)", "mib"),
    ("gemm_flops_per_s", "GEMM GFLOP/s (largest model matmul, best dtype)", "gflops"),
    ("mfu", "model FLOP utilisation, cold prefill", "{:.1%}"),
]


# figures of --deterministic-arms (report["deterministic"]), same run as the default arms
DETERMINISTIC: list[tuple[str, str, str]] = [
    ("det_greedy_agree_fraction", "requests whose greedy outputs agree, cache on vs off", "{:.1%}"),
    ("det_max_logprob_diff", "largest |logprob difference|, cache on vs off", "{:.2e}"),
    ("slowdown_cache", "total time / default mode's, cache on", "{:.2f}x"),
    ("slowdown_no-cache", "total time / default mode's, cache off", "{:.2f}x"),
    ("tokens_per_s_cache", "default mode, computed tokens/s, cache on", "{:.1f}"),
    ("det_tokens_per_s_cache", "computed tokens/s, cache on", "{:.1f}"),
]


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if spec == "mib":
        return f"{value / 2**20:,.0f}"
    if spec == "ratios":
        return ", ".join(f"{v:.2f}" for v in value)
    if spec == "gflops":
        return f"{value / 1e9:,.1f}"
    return spec.format(value)


def _seconds(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def markdown(report: dict[str, Any]) -> str:
    """The arms side by side, then the run's headline figures."""
    head = report.get("engine", {})
    where = (f"{head.get('url')}" if head.get("backend") == "http" else
             f"{head.get('dtype', '?')}, {report.get('host', {}).get('threads', '?')} threads")
    lines = [f"### {report['workload']} — {head.get('model', '?')}, {where}", ""]
    params = ", ".join(f"{k}={v}" for k, v in report.get("params", {}).items())
    host = report.get("host", {})
    flags = " ".join(host.get("cpu_flags", [])) or "none of avx2/avx512/amx"
    lines += [f"machine: {host.get('processor', '?')}, flags {flags}, {host.get('threads', '?')} threads; "
              f"{head.get('precision', '')}", ""]
    lines += [f"params: {params}", ""]
    if report.get("arms"):
        lines += ["| arm | requests | TTFT p50 (s) | TTFT p95 (s) | total (s) | hit rate | ideal hit rate |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for arm, s in report.get("arms", {}).items():
        ideal = s.get("ideal_hit_rate")
        lines.append(
            f"| {arm} | {s.get('requests', '')} | {_seconds(s.get('ttft_p50_s'))} | {_seconds(s.get('ttft_p95_s'))} "
            f"| {_seconds(s.get('total_s'))} | {s.get('hit_rate', 0.0):.1%} | "
            f"{'' if ideal is None else f'{ideal:.1%}'} |"
        )
    lines += ["", "| figure | value |", "| --- | ---: |"]
    for key, label, spec in FIGURES:
        if key in report:
            lines.append(f"| {label} | {_fmt(report[key], spec)} |")
    for key, label, spec in DETERMINISTIC:
        if key in report.get("deterministic", {}):
            lines.append(f"| deterministic mode: {label} | {_fmt(report['deterministic'][key], spec)} |")
    for key, value in report.get("tenant_probe", {}).items():
        lines.append(f"| tenant probe: {key.replace('_', ' ')} | {value} |")
    multi = report.get("multi_replica")
    if multi:
        for mode, row in multi["modes"].items():
            lines.append(f"| multi-replica, {mode.replace('_', '-')}: total | {row['total_s']} s; token hit rate "
                         f"{row['token_hit_rate']:.3f}; resends fully hit {row['resend_full_hit_rate']:.2f}; "
                         f"max replica load {row['max_load_vs_mean'] or 0:.2f}x mean |")
    tier = report.get("tier")
    if tier:
        for arm, ms in tier["median_ttft_ms"].items():
            lines.append(f"| tier: TTFT, prefix from {arm.replace('_', ' ')} (median) | {ms} ms "
                         f"({tier['ratio_to_recompute'][arm]:.3f}x recompute; {tier['cached_tokens'][arm]:.0f} "
                         "cached tokens) |")
        for name, rate in tier["load_gb_s"].items():
            lines.append(f"| tier: {name} load throughput | {'-' if rate is None else f'{rate} GB/s'} |")
        lines.append(f"| memory copy rate (numpy, 256 MiB) | {tier['memory_copy_gb_s']} GB/s |")
    quiet = report.get("quiet_wait_s")
    if quiet:
        lines.append(f"| waited for a quiet host (median), after ours / after the peer's | "
                     f"{_seconds(quiet['after ours'])} / {_seconds(quiet['after the peer'])} s |")
    for dtype, rate in report.get("gemm_flops_per_s_by_dtype", {}).items():
        lines.append(f"| GEMM GFLOP/s in {dtype} | {_fmt(rate, 'gflops')} |")
    for target in report.get("targets", []):
        mark = "met" if target["met"] else "NOT met"
        op = target.get("op", "≤")
        lines.append(f"| target: {target['name']} | {target['value']:.3f} {op} {target['limit']} ({mark}) |")
    return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def write_json(report: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(_jsonable(report), indent=2) + "\n")


def plot_ttft(report: dict[str, Any], path: str | Path) -> None:
    """TTFT of every request in submission order, one marker per arm, coloured by cached fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    markers = "os^Dvx+"
    fig, ax = plt.subplots(figsize=(9, 4.5))
    scatter = None
    for i, (arm, rows) in enumerate(report.get("requests", {}).items()):
        frac = [r["cached_tokens"] / r["prompt_tokens"] if r["prompt_tokens"] else 0.0 for r in rows]
        scatter = ax.scatter(range(len(rows)), [r["ttft_s"] for r in rows], c=frac, cmap="viridis",
                             vmin=0.0, vmax=1.0, marker=markers[i % len(markers)], label=arm,
                             edgecolors="black", linewidths=0.3)
    if scatter is not None:
        fig.colorbar(scatter, ax=ax, label="cached fraction of the prompt")
    ax.set_xlabel("repeat" if report["workload"] == "prefix-pair" else "request, in submission order")
    ax.set_ylabel("TTFT (s)")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    engine = report.get("engine", {})
    ax.set_title(f"{report['workload']}: {engine.get('model', '?')} {engine.get('dtype', '')}")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
