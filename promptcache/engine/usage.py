"""Usage accounting, in one place: every rule behind a request's usage and the engine's counters.

The dialects (server/openai_format.py, server/anthropic_prompt.py) only rename these fields.

Per request (``Usage``):

- ``prompt_tokens``: the prompt's length.
- ``cached_tokens``: prompt tokens reused from the cache at the request's *first* admission — whole
  blocks, never the last prompt token (it must run to produce logits). A preemption later
  recomputes or re-hits blocks, but the client was served that first hit: it is not counted again.
- ``cache_write_tokens``: prompt tokens of blocks this request indexed first, counted once even if
  a preemption made it compute and index them again; only blocks wholly inside the prompt (so the
  figure does not depend on ``max_tokens``); split by the retention they were stored with.
- ``completion_tokens``: generated tokens.
- ``reuse_stop``: why reuse ended where it did at that first admission (``cache.ReuseStop``:
  everything reusable reused, the next block in flight in another request, evicted / expired /
  reset — with how long it had been idle and how long ago — or never cached in this namespace).
- ``cached_tokens_by_tier``: how many of ``cached_tokens`` were loaded from a tier below memory
  (disk, Redis: engine/tiering.py) for this request; the others were in memory already.

Engine-wide (``EngineCounters``): the same per-request figures summed when a request that ran
finishes, plus tokens that ran through the model (prompt, recompute and decode), generated tokens,
and finished requests by reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from promptcache.cache import Retention, ReuseStop


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose K/V were reused, never recomputed
    cache_write_tokens: int = 0  # prompt tokens this request newly stored in the cache
    completion_tokens: int = 0
    # cache_write_tokens split by the retention (seconds) their blocks were stored with
    cache_write_tokens_by_ttl: dict[float, int] = field(default_factory=dict)
    reuse_stop: ReuseStop | None = None  # None until the request is first admitted
    # cached_tokens that were loaded from a tier below memory ("disk", "redis"); the rest were in memory
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)

    def snapshot(self) -> Usage:
        """A copy the caller may read on another thread while the engine goes on."""
        return Usage(self.prompt_tokens, self.cached_tokens, self.cache_write_tokens, self.completion_tokens,
                     dict(self.cache_write_tokens_by_ttl), self.reuse_stop, dict(self.cached_tokens_by_tier))


@dataclass
class EngineCounters:
    requests_added: int = 0
    prompt_tokens: int = 0  # prompt tokens of every admitted request
    cached_tokens: int = 0  # ... of which were reused from the cache
    computed_tokens: int = 0  # tokens that ran through the model (prompt, recompute and decode)
    generated_tokens: int = 0
    cache_write_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # by finish reason
    reuse_stops: dict[str, int] = field(default_factory=dict)  # admitted requests by ReuseStop.reason
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)  # ... loaded from a lower tier


class Accountable(Protocol):
    """What the ledger reads of a request (engine/request.py's ``Request``)."""

    usage: Usage
    retention: Retention
    written_blocks: set[int]
    output_token_ids: list[int]

    @property
    def num_prompt_tokens(self) -> int: ...

    @property
    def num_prompt_blocks(self) -> int: ...


class UsageLedger:
    """Applies the rules above as the engine reports what happened; owns ``EngineCounters``."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.counters = EngineCounters()

    def added(self, req: Accountable) -> None:
        req.usage.prompt_tokens = req.num_prompt_tokens
        self.counters.requests_added += 1

    def admitted(self, req: Accountable, hit_tokens: int, first: bool, stop: ReuseStop | None = None,
                 by_tier: dict[str, int] | None = None) -> None:
        if first:  # the hit the client was served; later re-admissions after a preemption do not count
            req.usage.cached_tokens = min(hit_tokens, req.num_prompt_tokens)
            req.usage.reuse_stop = stop
            req.usage.cached_tokens_by_tier = dict(by_tier or {})
            if stop is not None:
                self.counters.reuse_stops[stop.reason] = self.counters.reuse_stops.get(stop.reason, 0) + 1

    def computed(self, num_tokens: int) -> None:
        self.counters.computed_tokens += num_tokens

    def indexed(self, req: Accountable, newly_indexed: list[int]) -> None:
        """Blocks ``newly_indexed`` (indices in the request) were just stored in the cache by it."""
        bs = self.block_size
        for i in newly_indexed:
            if i >= req.num_prompt_blocks or i in req.written_blocks:
                continue
            req.written_blocks.add(i)
            ttl = req.retention.ttl_for_block(i, bs)
            by_ttl = req.usage.cache_write_tokens_by_ttl
            by_ttl[ttl] = by_ttl.get(ttl, 0) + bs
            req.usage.cache_write_tokens += bs
            self.counters.cache_write_tokens += bs

    def generated(self, req: Accountable) -> None:
        req.usage.completion_tokens = len(req.output_token_ids)
        self.counters.generated_tokens += 1

    def finished(self, req: Accountable, reason: str, ran: bool) -> None:
        if ran:  # a request aborted while it waited never reached the model: not in the token totals
            self.counters.prompt_tokens += req.num_prompt_tokens
            self.counters.cached_tokens += req.usage.cached_tokens
            for name, n in req.usage.cached_tokens_by_tier.items():
                self.counters.cached_tokens_by_tier[name] = self.counters.cached_tokens_by_tier.get(name, 0) + n
        self.counters.finished[reason] = self.counters.finished.get(reason, 0) + 1
