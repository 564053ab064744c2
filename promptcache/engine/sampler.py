"""Turn last-token logits into next tokens: greedy, temperature, top-k, top-p, seeded; logprobs."""

from __future__ import annotations

import torch

from promptcache.engine.request import TokenLogprob
from promptcache.engine.sampling import SamplingParams
from promptcache.engine.structured import Matcher


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._generators: dict[str, torch.Generator] = {}
        self._matchers: dict[str, Matcher] = {}
        self._base = torch.Generator().manual_seed(seed)
        self.eos_token_ids: list[int] = []  # allowed when a grammar leaves nothing else (an error state)

    def constrain(self, request_id: str, matcher: Matcher) -> None:
        self._matchers[request_id] = matcher

    def grammar_done(self, request_id: str) -> bool:
        m = self._matchers.get(request_id)
        return m is not None and m.done

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        self._matchers.pop(request_id, None)

    def _processed(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]) -> torch.Tensor:
        """``logits`` with each row's logit_bias added and its grammar's forbidden tokens at -inf."""
        rows = [i for i, (rid, p) in enumerate(zip(request_ids, params, strict=True))
                if p.logit_bias or rid in self._matchers]
        if not rows:
            return logits
        out = logits.clone()
        vocab = out.shape[-1]
        for i in rows:
            bias = params[i].logit_bias
            if bias:
                ids = torch.tensor([t for t in bias if t < vocab], dtype=torch.long)
                out[i, ids] += torch.tensor([bias[t] for t in bias if t < vocab], dtype=out.dtype)
            matcher = self._matchers.get(request_ids[i])
            if matcher is not None:
                allowed = matcher.allowed()
                if not allowed.any():  # the grammar is in an error state: end the output
                    allowed[[t for t in self.eos_token_ids if t < vocab]] = True
                out[i] = out[i].masked_fill(~allowed, float("-inf"))
        return out

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        gen = self._generators.get(request_id)
        if gen is None:
            # a request's seed alone fixes its samples, whatever else shares the batch
            if params.seed is not None:
                seed = params.seed % 2**63  # any integer a client sends is a valid seed
            else:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._base).item())
            gen = self._generators[request_id] = torch.Generator().manual_seed(seed)
        return gen

    def sample(
        self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        # logits: [B, vocab] float32; logprobs are reported from them as the model gave them
        logits = logits.cpu()
        processed = self._processed(logits, request_ids, params)
        # max().indices: the same first-maximum rule as argmax, ~4x faster over a wide vocab on CPU
        # (32 rows x 49,152: 0.5 vs 1.9 ms)
        tokens = processed.max(dim=-1).indices.tolist()
        for row, (rid, p) in enumerate(zip(request_ids, params, strict=True)):
            if not p.greedy:
                tokens[row] = self._sample_row(processed[row], p, self._generator(rid, p))
            matcher = self._matchers.get(rid)
            if matcher is not None:
                matcher.accept(tokens[row])
        need_lp = [i for i, p in enumerate(params) if p.logprobs is not None]
        logprobs: list[TokenLogprob | None] = [None] * len(params)
        if need_lp:
            lp = torch.log_softmax(logits[need_lp], dim=-1)  # [k, vocab]
            for j, row in enumerate(need_lp):
                logprobs[row] = _token_logprob(lp[j], tokens[row], params[row].logprobs or 0)
        return tokens, logprobs

    @staticmethod
    def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
        scaled = logits / p.temperature  # [vocab]
        if p.top_k > 0 and p.top_k < scaled.shape[-1]:
            kth = torch.topk(scaled, p.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(scaled, descending=True)
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            # keep the smallest set whose mass reaches top_p (always at least the top token)
            drop = cum - torch.softmax(sorted_logits, dim=-1) >= p.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            scaled = torch.full_like(scaled, float("-inf")).scatter(0, order, sorted_logits)
        probs = torch.softmax(scaled, dim=-1)
        if not torch.isfinite(probs).all():  # NaN logits (a broken checkpoint): fall back to argmax
            return int(logits.nan_to_num(nan=float("-inf")).argmax().item())
        return int(torch.multinomial(probs, 1, generator=gen).item())


def _token_logprob(lp: torch.Tensor, token: int, k: int) -> TokenLogprob:
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        values, ids = torch.topk(lp, k)
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(lp[token].item()), top)
