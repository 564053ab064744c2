"""``prefix-pair``: a prompt of P tokens, then one sharing its first P - S tokens.

Three TTFTs, medians over the repeats:

- ``cold``: the whole prompt with the cache empty (``reset_prefix_cache()`` before it);
- ``warm``: the second prompt, its P - S prefix cached by the first;
- ``suffix_only``: a fresh prompt of just S tokens, cache empty. The work left on a hit is the
  suffix (plus its attention over the cached context), so this is the ideal the warm path chases.

Repeats alternate which of the two prompts goes first, so from two repeats on each prompt has run
both cold and warm and the greedy outputs are compared without extra work; with one repeat the
second prompt is also run cold once. Over HTTP (no reset) each repeat uses fresh ids instead.

With a peer (``--peer-url``: vLLM, llama.cpp, another promptcache) the peer runs the same ids, request
by request: ours cold, the peer's cold, ours warm, the peer's warm, ... and the next repeat the peer
first. A noisy host's slow phases then hit both alike (two runs minutes apart moved a warm TTFT by
±25 % on a shared 2-core VM), and each repeat gives a ratio of its own. Before each of those
requests the bench waits for the host's CPUs to go quiet (``settle``): a server on the same host
may keep a core busy after it answers — vLLM's CPU workers poll for about a second after each
request — and the next request, timed on the other server, would pay for it (measured: our warm
TTFT 1.30 s right after vLLM's requests, 0.45 s on a quiet host).
"""

from __future__ import annotations

from collections.abc import Callable
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


KINDS = ("cold", "warm", "suffix-only")


def run_prefix_pair(pp: PrefixPair, backend: Backend, baseline: TransformersBaseline | None = None,
                    progress: bool = True, peer: Backend | None = None,
                    settle: Callable[[], float] | None = None) -> dict[str, Any]:
    """The engine's repeats, each followed by the baseline's (interleaved: noise hits both alike);
    ``peer``: another server on the same ids, request by request (see the module's docstring);
    ``settle``: called before each of those requests, it waits for the host to go quiet and returns
    the seconds it waited."""
    bar = tqdm(total=pp.repeats, unit="repeat", desc="prefix-pair", disable=not progress, leave=False)
    warm_up(backend)
    if peer is not None:
        warm_up(peer)
    tf = _BaselinePair(pp, baseline) if baseline is not None else None
    # fresh ids per repeat where a cache cannot be reset — the peer's never can, and both sides
    # must see the same ids
    fresh = not backend.can_reset or peer is not None
    samples: dict[str, list[RequestResult]] = {kind: [] for kind in KINDS}
    theirs: dict[str, list[RequestResult]] = {kind: [] for kind in KINDS}
    cold_out: dict[int, RequestResult] = {}  # which prompt (0 or 1) -> a cold run of it
    warm_out: dict[int, RequestResult] = {}
    quiet: dict[str, list[float]] = {"": [], "peer-": []}  # seconds waited after each side's requests
    last = "peer-" if peer is not None else ""  # the peer's warm-up ran last
    for r in range(pp.repeats):
        pair = pp.prompts(pp.repeat_seed(r) if fresh else pp.seed)
        first = 0 if fresh else r % 2
        prompts = {"cold": pair[first], "warm": pair[1 - first], "suffix-only": pair[2]}
        sides = [(backend, samples, "")] + ([(peer, theirs, "peer-")] if peer is not None else [])
        for kind in KINDS:
            for side, into, tag in sides if r % 2 == 0 else sides[::-1]:
                if peer is not None and settle is not None:
                    quiet[last].append(settle())
                name = f"{tag}{kind.split('-')[0]}-{r}"
                into[kind].append(_one(side, name, prompts[kind], pp.output_tokens, reset=kind != "warm"))
                last = tag
        if not fresh:
            cold_out.setdefault(first, samples["cold"][-1])
            warm_out.setdefault(1 - first, samples["warm"][-1])
        if tf is not None:
            tf.repeat(pair[first], pair[1 - first])
        bar.update(1)
    if backend.can_reset and not fresh and 1 not in cold_out:  # one repeat: run the second prompt cold too
        cold_out[1] = _one(backend, "cold-check", pp.prompts(pp.seed)[1], pp.output_tokens, reset=True)
    bar.close()
    report = _summarise(pp, samples, cold_out, warm_out)
    if peer is not None:
        report.update(_peer_figures(samples, theirs))
        if settle is not None:
            report["quiet_wait_s"] = {"after ours": median(quiet[""]), "after the peer": median(quiet["peer-"])}
        for kind in KINDS:
            report["requests"][f"peer {kind}"] = [request_row(x) for x in theirs[kind]]
            report["arms"][f"peer {kind}"] = summarize(theirs[kind], with_ideal=False)
    if tf is not None:
        report.update(tf.summary())
        for arm, results in tf.arms().items():
            report["requests"][arm] = [request_row(x) for x in results]
            report["arms"][arm] = summarize(results, with_ideal=False)
        report["cold_over_transformers_cold"] = report["cold_ttft_s"] / report["transformers_cold_ttft_s"]
        report["warm_over_transformers_warm"] = report["warm_ttft_s"] / report["transformers_warm_ttft_s"]
    return report


def _peer_figures(ours: dict[str, list[RequestResult]], theirs: dict[str, list[RequestResult]]) -> dict[str, Any]:
    """Medians of the peer's TTFTs, ours over theirs (ratio of the medians, and each repeat's own
    ratio: both sides of a repeat ran within seconds of each other), and how often the two sides'
    greedy outputs agree (the same ids; kernels round differently, so this informs, never fails)."""
    out: dict[str, Any] = {"peer_cached_tokens": min(x.cached_tokens for x in theirs["warm"]),
                           # > 0: "cold" hit (a long-lived server given a --seed it had seen)
                           "peer_cold_cached_tokens": max(x.cached_tokens for x in theirs["cold"])}
    pairs = [(a, b) for kind in KINDS for a, b in zip(ours[kind], theirs[kind], strict=True)]
    out["peer_greedy_agree_fraction"] = sum(a.same_output(b) for a, b in pairs) / len(pairs)
    for kind in KINDS:
        key = kind.replace("-", "_")
        out[f"peer_{key}_ttft_s"] = median([x.ttft_s for x in theirs[kind]])
        out[f"{key}_over_peer_{key}"] = median([x.ttft_s for x in ours[kind]]) / out[f"peer_{key}_ttft_s"]
        out[f"{key}_over_peer_{key}_per_repeat"] = [a.ttft_s / b.ttft_s
                                                    for a, b in zip(ours[kind], theirs[kind], strict=True)]
    return out


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
        greedy = all(cold_out[i].same_output(w) for i, w in warm_out.items())
    report: dict[str, Any] = {
        "workload": "prefix-pair",
        "params": pp.params(),
        "cold_ttft_s": median(ttft["cold"]),
        "warm_ttft_s": median(ttft["warm"]),
        "suffix_only_ttft_s": median(ttft["suffix-only"]),
        "cached_tokens": min(x.cached_tokens for x in samples["warm"]),
        "cold_cached_tokens": max(x.cached_tokens for x in samples["cold"]),  # > 0: "cold" hit
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
