"""Cache-aware routing as a pure function: which replica should serve a request.

The request is its tenant-namespaced block-hash chain (the engine's own hashes, computed once at
the ingress) and its ``prompt_cache_key``; each replica is what it holds (``ReplicaIndex``: fed by
the replicas' block add / evict events, entries with TTLs, a dead replica dropped at once) and its
load (queued + running tokens). Every live replica gets a cost:

    cost = blocks it would compute x compute cost + blocks it could fetch from the shared tier x
           fetch cost + its load in tokens x load weight

and the ranking is by cost, with two rules on top, never a fleet-wide on/off switch:

- **bounded load**: a replica above ``max_load_ratio`` x the mean load (and ``load_slack_tokens``
  above it) is passed over while another is not (so no replica stays above ~1.25x the mean for long);
- **hot prefixes spread**: a prefix + key seen more than ``hot_per_minute`` times in the last
  minute may go to its second-best replica too (the cheaper of the two by load), instead of melting
  the first.

Tenants' chains differ from their first block (the namespace), so a system prompt every tenant
shares does not pull all tenants to one replica. Torch-free and Ray-free: tested exactly.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from promptcache.cache.hashing import BlockHash


@dataclass(frozen=True)
class Costs:
    compute_per_block: float = 1.0  # relative time to compute one block
    fetch_per_block: float = 0.15  # ... to load it from the shared tier instead (measured: ~0.15x)
    load_per_block: float = 0.5  # weight of one block of queued / running work already on a replica
    max_load_ratio: float = 1.25
    # ... and a replica is over that bound only when it is also this many tokens above the mean: a
    # lightly loaded fleet's fluctuations (a few requests in flight) never break affinity
    load_slack_tokens: int = 2048
    hot_per_minute: int = 15  # above this, a prefix + key spreads to a second replica
    hot_prefix_blocks: int = 16  # how much of the chain identifies "a prefix" (256 tokens of 16)


@dataclass(frozen=True)
class Replica:
    name: str
    load_tokens: int  # queued + running tokens
    alive: bool = True


@dataclass(frozen=True)
class Choice:
    name: str
    cost: float
    matched_blocks: int  # of the chain, held by this replica
    reason: str  # "affinity" | "least_cost" | "load_bound" | "hot_spread" | "fallback"


class Holdings(Protocol):
    def matched(self, replica: str, chain: Sequence[BlockHash]) -> int:
        """Blocks of ``chain``, from the first on, that ``replica`` holds."""
        ...


class ReplicaIndex:
    """Which replica holds which block hash, until when. Fed by events; a replica that dies or
    restarts is dropped at once."""

    def __init__(self, ttl_s: float = 3600.0, clock: Callable[[], float] = time.monotonic,
                 max_per_replica: int = 1 << 16) -> None:
        self.ttl_s, self.clock, self.max_per_replica = ttl_s, clock, max_per_replica
        self._held: dict[str, dict[BlockHash, float]] = {}

    def added(self, replica: str, hashes: Sequence[BlockHash], ttl_s: float | None = None) -> None:
        """Entries are kept in the order they expire (each add moves its hashes to the end), so
        expired ones and, past ``max_per_replica``, the oldest are dropped from the front."""
        now = self.clock()
        until = now + (self.ttl_s if ttl_s is None else ttl_s)
        mine = self._held.setdefault(replica, {})
        for h in hashes:
            mine.pop(h, None)
            mine[h] = until
        while mine:
            first = next(iter(mine))
            if mine[first] > now and len(mine) <= self.max_per_replica:
                break
            del mine[first]

    def evicted(self, replica: str, hashes: Sequence[BlockHash]) -> None:
        mine = self._held.get(replica, {})
        for h in hashes:
            mine.pop(h, None)

    def drop(self, replica: str) -> None:
        self._held.pop(replica, None)

    def matched(self, replica: str, chain: Sequence[BlockHash]) -> int:
        """Blocks of ``chain``, from the first on, the replica holds (expired entries do not count)."""
        mine = self._held.get(replica, {})
        now = self.clock()
        n = 0
        for h in chain:
            until = mine.get(h)
            if until is None or until <= now:
                break
            n += 1
        return n

    def size(self, replica: str) -> int:
        return len(self._held.get(replica, {}))


@dataclass
class HotPrefixes:
    """Requests per (prefix, key) over the last minute."""

    clock: Callable[[], float] = time.monotonic
    _seen: dict[tuple[BlockHash | None, str | None], deque[float]] = field(default_factory=dict)

    def hit(self, prefix: BlockHash | None, key: str | None) -> int:
        now = self.clock()
        times = self._seen.pop((prefix, key), None) or deque()
        times.append(now)
        while times and times[0] <= now - 60.0:
            times.popleft()
        self._seen[(prefix, key)] = times  # most recently seen last
        while self._seen:  # forget pairs quiet for a minute (bounded by the last minute's traffic)
            oldest = next(iter(self._seen))
            if self._seen[oldest][-1] > now - 60.0:
                break
            del self._seen[oldest]
        return len(times)


def _tiebreak(chain: Sequence[BlockHash], replica: str) -> bytes:
    """Equal costs (nothing held, equal load) are broken by a hash of the prefix's first block and
    the replica (rendezvous hashing): distinct prefixes spread evenly, the same one picks the same."""
    head = bytes(chain[0]) if chain else b""
    return hashlib.blake2b(head + replica.encode(), digest_size=8).digest()


def rank(chain: Sequence[BlockHash], cache_key: str | None, replicas: Sequence[Replica], index: Holdings,
         block_size: int, shared: Callable[[Sequence[BlockHash]], int] | None = None,
         costs: Costs = Costs(), hot: HotPrefixes | None = None) -> list[Choice]:
    """Live replicas, best first. ``shared(chain_rest)`` says how many blocks from the start of the
    rest the shared tier (Redis) holds."""
    live = [r for r in replicas if r.alive]
    if not live:
        return []
    scored = []
    for r in live:
        matched = index.matched(r.name, chain)
        rest = chain[matched:]
        fetchable = shared(rest) if shared is not None and rest else 0
        compute = len(chain) - matched - fetchable
        cost = (compute * costs.compute_per_block + fetchable * costs.fetch_per_block
                + r.load_tokens / block_size * costs.load_per_block)
        scored.append((cost, r.name, matched, r))
    scored.sort(key=lambda s: (s[0], _tiebreak(chain, s[1])))
    mean = sum(r.load_tokens for r in live) / len(live)
    bound = costs.max_load_ratio * mean

    def over(r: Replica) -> bool:
        return len(live) > 1 and mean > 0 and r.load_tokens > bound and r.load_tokens - mean > costs.load_slack_tokens

    ordered = [s for s in scored if not over(s[3])] + [s for s in scored if over(s[3])]
    best = ordered[0]
    reason = "affinity" if best[2] > 0 else "least_cost"
    if best is not scored[0]:
        reason = "load_bound"
    if not ordered or all(over(s[3]) for s in ordered):
        reason = "fallback"
    choices = [Choice(name, cost, matched, "") for cost, name, matched, _ in ordered]
    if hot is not None and len(ordered) > 1:
        prefix = chain[min(len(chain), costs.hot_prefix_blocks) - 1] if chain else None
        if hot.hit(prefix, cache_key) > costs.hot_per_minute:
            first, second = ordered[0][3], ordered[1][3]
            if second.load_tokens < first.load_tokens:  # spread the hot prefix to the second replica
                choices[0], choices[1] = choices[1], choices[0]
                reason = "hot_spread"
    choices[0] = Choice(choices[0].name, choices[0].cost, choices[0].matched_blocks, reason)
    return choices
