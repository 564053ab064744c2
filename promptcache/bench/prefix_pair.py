"""``prefix-pair``: a prompt of P tokens, then one sharing its first P - S tokens.

Three TTFTs, medians over the repeats:

- ``cold``: the whole prompt with the cache empty (``reset_prefix_cache()`` before it);
- ``warm``: the second prompt, its P - S prefix cached by the first;
- ``suffix_only``: a fresh prompt of just S tokens, cache empty. The work left on a hit is the
  suffix (plus its attention over the cached context), so this is the ideal the warm path chases.

Repeats alternate which of the two prompts goes first, so from two repeats on each prompt has run
both cold and warm and the greedy outputs are compared without extra work; with one repeat the
second prompt is also run cold once. Over HTTP (no reset) each repeat uses fresh ids instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from promptcache.bench.backends import Backend, RequestResult
from promptcache.bench.baselines import TransformersBaseline
from promptcache.bench.machine import median
from promptcache.bench.runner import request_row, summarize, warm_up
from promptcache.bench.workloads import BenchRequest, TokenSource


@dataclass(frozen=True)
class PrefixPair:
    prompt_tokens: int = 2048  # P
    suffix_tokens: int = 64  # S
    output_tokens: int = 8
    repeats: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.suffix_tokens < self.prompt_tokens:
            raise ValueError("prefix-pair needs 0 < --suffix-tokens < --prompt-tokens")
        if self.repeats < 1:
            raise ValueError("--repeats must be >= 1")

    @property
    def shared_tokens(self) -> int:
        return self.prompt_tokens - self.suffix_tokens

    def prompts(self, seed: int) -> tuple[list[int], list[int], list[int]]:
        """(first, second, suffix-only): first and second share their first P - S ids."""
        src = TokenSource(seed)
        prefix = src.take(self.shared_tokens)
        return prefix + src.take(self.suffix_tokens), prefix + src.take(self.suffix_tokens), src.take(
            self.suffix_tokens
        )

    def repeat_seed(self, repeat: int) -> int:
        """The ids of a repeat where the cache cannot be reset (a server): runs at different
        ``--seed`` values never share a repeat's ids (``seed + repeat`` made runs at consecutive seeds
        share prompts, so the second run's "cold" prompts were cached by the first's). The same seed
        twice against one server repeats its prompts: use a fresh seed per run."""
        return self.seed * 1_000_003 + repeat + 1

    def params(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "suffix_tokens": self.suffix_tokens,
                "output_tokens": self.output_tokens, "repeats": self.repeats, "seed": self.seed}


def _one(backend: Backend, name: str, prompt: list[int], max_tokens: int, reset: bool) -> RequestResult:
    if reset and backend.can_reset:
        backend.reset_cache()
    (res,) = backend.run_wave([BenchRequest(name, prompt, max_tokens)])
    return res


def run_prefix_pair(pp: PrefixPair, backend: Backend, baseline: TransformersBaseline | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """The engine's repeats, each followed by the baseline's (interleaved: noise hits both alike)."""
    bar = tqdm(total=pp.repeats, unit="repeat", desc="prefix-pair", disable=not progress, leave=False)
    warm_up(backend)
    tf = _BaselinePair(pp, baseline) if baseline is not None else None
    samples: dict[str, list[RequestResult]] = {"cold": [], "warm": [], "suffix-only": []}
    cold_out: dict[int, RequestResult] = {}  # which prompt (0 or 1) -> a cold run of it
    warm_out: dict[int, RequestResult] = {}
    for r in range(pp.repeats):
        pair = pp.prompts(pp.seed if backend.can_reset else pp.repeat_seed(r))
        first = r % 2 if backend.can_reset else 0
        cold = _one(backend, f"cold-{r}", pair[first], pp.output_tokens, reset=True)
        warm = _one(backend, f"warm-{r}", pair[1 - first], pp.output_tokens, reset=False)
        suffix = _one(backend, f"suffix-{r}", pair[2], pp.output_tokens, reset=True)
        samples["cold"].append(cold)
        samples["warm"].append(warm)
        samples["suffix-only"].append(suffix)
        if backend.can_reset:
            cold_out.setdefault(first, cold)
            warm_out.setdefault(1 - first, warm)
        if tf is not None:
            tf.repeat(pair[first], pair[1 - first])
        bar.update(1)
    if backend.can_reset and 1 not in cold_out:  # one repeat: run the second prompt cold as well
        cold_out[1] = _one(backend, "cold-check", pp.prompts(pp.seed)[1], pp.output_tokens, reset=True)
    bar.close()
    report = _summarise(pp, samples, cold_out, warm_out)
    if tf is not None:
        report.update(tf.summary())
        for arm, results in tf.arms().items():
            report["requests"][arm] = [request_row(x) for x in results]
            report["arms"][arm] = summarize(results, with_ideal=False)
        report["cold_over_transformers_cold"] = report["cold_ttft_s"] / report["transformers_cold_ttft_s"]
        report["warm_over_transformers_warm"] = report["warm_ttft_s"] / report["transformers_warm_ttft_s"]
    return report


class _BaselinePair:
    """transformers on the same prompts: the full prompt cold, the suffix on a copied prefix cache."""

    def __init__(self, pp: PrefixPair, baseline: TransformersBaseline) -> None:
        self.pp, self.baseline = pp, baseline
        first = pp.prompts(pp.seed)[0]
        baseline.cold_ttft(first[: pp.suffix_tokens])  # warm-up
        self.prefix_cache = baseline.prefill(first[: pp.shared_tokens])  # untimed, once
        self.cold: list[float] = []
        self.warm: list[float] = []
        self.copies: list[float] = []

    def repeat(self, cold_prompt: list[int], warm_prompt: list[int]) -> None:
        seconds, _ = self.baseline.cold_ttft(cold_prompt)
        self.cold.append(seconds)
        seconds, copy_s, _ = self.baseline.warm_ttft(self.prefix_cache, warm_prompt[self.pp.shared_tokens :])
        self.warm.append(seconds)
        self.copies.append(copy_s)

    def arms(self) -> dict[str, list[RequestResult]]:
        """Per-repeat results in the shape of the engine's (for the table and the plot)."""
        p, shared = self.pp.prompt_tokens, self.pp.shared_tokens

        def result(name: str, cached: int, t: float) -> RequestResult:
            return RequestResult(name, p, cached, [], "", 0, t, t)

        return {
            "transformers cold": [result(f"tf-cold-{i}", 0, t) for i, t in enumerate(self.cold)],
            "transformers warm": [result(f"tf-warm-{i}", shared, t) for i, t in enumerate(self.warm)],
        }

    def summary(self) -> dict[str, Any]:
        return {
            "transformers_cold_ttft_s": median(self.cold),
            "transformers_warm_ttft_s": median(self.warm),
            "transformers_cache_copy_s": median(self.copies),
            "transformers_samples": {"cold": self.cold, "warm": self.warm, "copy": self.copies},
            "transformers": self.baseline.describe(),
        }


def _summarise(pp: PrefixPair, samples: dict[str, list[RequestResult]], cold_out: dict[int, RequestResult],
               warm_out: dict[int, RequestResult]) -> dict[str, Any]:
    ttft = {arm: [x.ttft_s for x in xs] for arm, xs in samples.items()}
    greedy: bool | None = None
    if warm_out:
        greedy = all(cold_out[i].output_key == w.output_key for i, w in warm_out.items())
    report: dict[str, Any] = {
        "workload": "prefix-pair",
        "params": pp.params(),
        "cold_ttft_s": median(ttft["cold"]),
        "warm_ttft_s": median(ttft["warm"]),
        "suffix_only_ttft_s": median(ttft["suffix-only"]),
        "cached_tokens": min(x.cached_tokens for x in samples["warm"]),
        "ideal_cached_tokens": pp.shared_tokens,
        "greedy_match": greedy,
        "samples": ttft,
        "arms": {arm: summarize(xs, with_ideal=False) for arm, xs in samples.items()},
    }
    report["warm_over_suffix_only"] = report["warm_ttft_s"] / report["suffix_only_ttft_s"]
    report["warm_over_cold"] = report["warm_ttft_s"] / report["cold_ttft_s"]
    report["prefill_tokens_per_s"] = pp.prompt_tokens / report["cold_ttft_s"]
    report["requests"] = {arm: [request_row(x) for x in xs] for arm, xs in samples.items()}
    return report
