"""Run a workload through each arm (cache on, cache off), and the throughput micro-benchmarks.

Every headline figure is a ratio inside one run: the arms see the same token ids on the same
weights, and their greedy outputs must match (reuse must not change results).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from promptcache.bench.backends import Backend, RequestResult
from promptcache.bench.machine import percentile
from promptcache.bench.workloads import BenchRequest, TokenSource, Workload, ideal_cached_tokens

if TYPE_CHECKING:
    from promptcache.engine.llm_engine import LLMEngine


@dataclass
class ArmResult:
    arm: str
    results: list[RequestResult]  # in submission order
    total_s: float  # first submit -> last token of the last wave
    counters: dict[str, int]  # what the backend's counters grew by during the arm (engine only)

    def summary(self) -> dict[str, Any]:
        return {
            **summarize(self.results, with_ideal=True),
            "total_s": self.total_s,
            **{k: self.counters[k] for k in ("computed_tokens", "blocks_evicted") if k in self.counters},
        }


def summarize(results: list[RequestResult], with_ideal: bool) -> dict[str, Any]:
    """One arm's figures from its requests (every workload, prefix-pair included, uses this)."""
    ttfts = [r.ttft_s for r in results]
    prompt = sum(r.prompt_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    out: dict[str, Any] = {
        "requests": len(results),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
        "ttft_min_s": min(ttfts, default=float("nan")),
        "ttft_max_s": max(ttfts, default=float("nan")),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_rate": cached / prompt if prompt else 0.0,
        "output_tokens": sum(r.completion_tokens for r in results),
    }
    if with_ideal:
        ideal = sum(r.ideal_cached_tokens for r in results)
        out.update(ideal_cached_tokens=ideal, ideal_hit_rate=ideal / prompt if prompt else 0.0)
    return out


def run_arm(arm: str, workload: Workload, backend: Backend, bar: tqdm | None = None) -> ArmResult:
    """All waves of ``workload`` on ``backend``, each wave after the previous one finished."""
    outputs: dict[str, list[int]] = {}
    results: list[RequestResult] = []
    waves: list[list[tuple[list[int], list[int]]]] = []
    on_done = bar.update if bar is not None else None
    if bar is not None:
        bar.set_description(arm)
    before = backend.counters()
    start = time.perf_counter()
    for index in range(workload.num_waves()):
        requests = workload.wave(index, outputs)
        wave_results = backend.run_wave(requests, on_done)
        for req, res in zip(requests, wave_results, strict=True):
            res.wave = index
            outputs[req.name] = res.output_ids
        waves.append([(req.prompt_ids, res.output_ids) for req, res in zip(requests, wave_results, strict=True)])
        results += wave_results
    total = time.perf_counter() - start
    after = backend.counters()
    ideal = [n for wave in ideal_cached_tokens(waves) for n in wave]
    for res, n in zip(results, ideal, strict=True):
        res.ideal_cached_tokens = n
    return ArmResult(arm, results, total, {k: after[k] - before.get(k, 0) for k in after})


def warm_up(backend: Backend, num_tokens: int = 64) -> None:
    """One short untimed request (first-call kernel set-up, lazily touched KV pages), then an empty cache."""
    backend.run_wave([BenchRequest("warm-up", TokenSource(40_000).take(num_tokens), 2)])
    if backend.can_reset:
        backend.reset_cache()


def num_requests(workload: Workload) -> int:
    """Requests in the workload; waves are built with empty outputs just to count them."""
    return sum(len(workload.wave(i, {})) for i in range(workload.num_waves()))


def greedy_mismatches(a: ArmResult, b: ArmResult) -> list[str]:
    """Names of requests whose greedy outputs differ between two arms."""
    theirs = {r.name: r for r in b.results}
    return [r.name for r in a.results if r.name not in theirs or not r.same_output(theirs[r.name])]


def agreement(a: ArmResult, b: ArmResult) -> dict[str, Any]:
    """How far two arms' results are apart: the fraction of requests whose greedy outputs agree,
    and the largest |logprob difference| of a generated token over positions whose preceding
    tokens agree (after a flip the contexts differ; the flip's own position still counts)."""
    theirs = {r.name: r for r in b.results}
    mismatches = greedy_mismatches(a, b)
    diff: float | None = None
    for r in a.results:
        other = theirs.get(r.name)
        if other is None or not r.output_logprobs or not other.output_logprobs:
            continue
        for i, (x, y) in enumerate(zip(r.output_logprobs, other.output_logprobs, strict=False)):
            diff = max(diff or 0.0, abs(x - y))
            if r.output_ids[i] != other.output_ids[i]:
                break
    return {
        "greedy_match": not mismatches,
        "greedy_mismatches": mismatches,
        "greedy_agree_fraction": 1 - len(mismatches) / len(a.results) if a.results else 1.0,
        "max_logprob_diff": diff,
    }


def run_workload(workload: Workload, arms: dict[str, Backend], progress: bool = True,
                 settle: Callable[[], float] | None = None) -> dict[str, Any]:
    """Every arm through the whole workload; each starts from an empty cache where it can.
    ``settle``: called before each arm (waits for the host to go quiet after the previous one)."""
    bar = tqdm(total=num_requests(workload) * len(arms), unit="req", disable=not progress, leave=False)
    results: dict[str, ArmResult] = {}
    for arm, backend in arms.items():
        if settle is not None:
            settle()
        warm_up(backend)
        results[arm] = run_arm(arm, workload, backend, bar)
    bar.close()
    report: dict[str, Any] = {
        "workload": workload.name,
        "params": workload.params(),
        "arms": {arm: r.summary() for arm, r in results.items()},
        "requests": {arm: [request_row(x) for x in r.results] for arm, r in results.items()},
    }
    if "cache" in results and "no-cache" in results:
        report.update(agreement(results["cache"], results["no-cache"]))
        on, off = results["cache"].total_s, results["no-cache"].total_s
        report["speedup_total"] = off / on if on > 0 else float("nan")
        p50_on, p50_off = report["arms"]["cache"]["ttft_p50_s"], report["arms"]["no-cache"]["ttft_p50_s"]
        report["speedup_ttft_p50"] = p50_off / p50_on if p50_on > 0 else float("nan")
    if "cache" in results and "peer" in results:  # another server, the same ids, after ours
        ours, theirs = report["arms"]["cache"], report["arms"]["peer"]
        report["total_over_peer"] = _ratio(results["cache"].total_s, results["peer"].total_s)
        report["ttft_p50_over_peer"] = _ratio(ours["ttft_p50_s"], theirs["ttft_p50_s"])
        report["peer_greedy_agree_fraction"] = agreement(results["cache"], results["peer"])["greedy_agree_fraction"]
    if "det-cache" in results and "det-no-cache" in results:
        report["deterministic"] = _deterministic_figures(results)
    return report


def _deterministic_figures(results: dict[str, ArmResult]) -> dict[str, Any]:
    """The deterministic mode's price (same workload, same run) and its exactness, cache on vs off."""
    det = {f"det_{k}": v for k, v in agreement(results["det-cache"], results["det-no-cache"]).items()}
    for arm in ("cache", "no-cache"):
        fast, slow = results[arm], results[f"det-{arm}"]
        det[f"slowdown_{arm}"] = _ratio(slow.total_s, fast.total_s)
        det[f"tokens_per_s_{arm}"] = _ratio(_computed_tokens(fast), fast.total_s)
        det[f"det_tokens_per_s_{arm}"] = _ratio(_computed_tokens(slow), slow.total_s)
    return det


def _computed_tokens(arm: ArmResult) -> int:
    """Tokens the arm ran through the model: uncached prompt tokens plus generated ones."""
    return sum(r.prompt_tokens - r.cached_tokens + r.completion_tokens for r in arm.results)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def request_row(r: RequestResult) -> dict[str, Any]:
    return {"name": r.name, "wave": r.wave, "prompt_tokens": r.prompt_tokens, "cached_tokens": r.cached_tokens,
            "ideal_cached_tokens": r.ideal_cached_tokens, "ttft_s": r.ttft_s, "latency_s": r.latency_s,
            "output_tokens": r.completion_tokens}


# ---- throughput micro-benchmarks ---------------------------------------------------------------


def measure_prefill(backend: Backend, num_tokens: int, seed: int) -> dict[str, float]:
    """Cold prefill of one fresh prompt: TTFT of ``num_tokens`` tokens with nothing cached."""
    if backend.can_reset:
        backend.reset_cache()
    prompt = TokenSource(seed).take(num_tokens)
    (res,) = backend.run_wave([BenchRequest("prefill", prompt, 1)])
    return {"prefill_tokens": num_tokens, "prefill_s": res.ttft_s,
            "prefill_tokens_per_s": (num_tokens - res.cached_tokens) / res.ttft_s}


def measure_decode(backend: Backend, batch: int, prompt_tokens: int, output_tokens: int, seed: int) -> float:
    """Output tokens/s of ``batch`` greedy streams decoding together (after their first token)."""
    if output_tokens < 2:
        raise ValueError("decode throughput needs --decode-tokens >= 2")
    src = TokenSource(seed)
    requests = [BenchRequest(f"decode-{i}", src.take(prompt_tokens), output_tokens) for i in range(batch)]
    results = backend.run_wave(requests)
    # every stream has its first token once the slowest prefill is done; decode runs from there
    decode_s = max(r.latency_s for r in results) - max(r.ttft_s for r in results)
    tokens = sum(max(0, r.completion_tokens - 1) for r in results)
    return tokens / decode_s if decode_s > 0 else float("nan")


# A schema that keeps a random model writing (many bounded items) while every token is masked.
STRUCTURED_SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "maxItems": 64, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}},
    "required": ["name", "n"], "additionalProperties": False}}}, "required": ["items"], "additionalProperties": False}


def measure_structured_decode(engine: LLMEngine, prompt_tokens: int, output_tokens: int, seed: int,
                              batch: int = 4) -> dict[str, float]:
    """Decode tokens/s of ``batch`` sampled streams with and without a JSON-schema grammar, same
    prompts and seeds, one after the other, over the steps that decode all ``batch`` streams: the
    per-token cost of constrained decoding."""
    from promptcache.engine.request import RequestSpec
    from promptcache.engine.sampling import SamplingParams, StructuredOutput

    src = TokenSource(seed)
    prompts = [src.take(prompt_tokens) for _ in range(batch)]
    structured = StructuredOutput.json_schema(STRUCTURED_SCHEMA)
    rates = {}
    for arm, constraint in (("free", None), ("json_schema", structured)):
        engine.reset_prefix_cache()
        if constraint is not None:  # compile outside the timed loop, as the server does off-thread
            engine.grammars.matcher(constraint)
        for i, p in enumerate(prompts):
            engine.add_request(RequestSpec(f"{arm}-{i}", p, SamplingParams(
                max_tokens=output_tokens, temperature=1.0, seed=seed + i, ignore_eos=True, structured=constraint)))
        tokens, elapsed = 0, 0.0
        while engine.has_unfinished_requests():
            started = time.perf_counter()
            outs = engine.step()
            took = time.perf_counter() - started
            # only decode steps of the whole batch count: a grammar that completes early ends its
            # stream, and a smaller batch would read as a slower one
            if len(outs) == batch and all(len(o.token_ids) > 1 for o in outs):
                tokens += sum(len(o.new_token_ids) for o in outs)
                elapsed += took
        rates[arm] = tokens / elapsed if elapsed > 0 else float("nan")
    return {"decode_tokens_per_s_free_b4": rates["free"], "decode_tokens_per_s_json_schema_b4": rates["json_schema"],
            "json_schema_decode_cost": rates["free"] / rates["json_schema"] if rates["json_schema"] else float("nan")}
