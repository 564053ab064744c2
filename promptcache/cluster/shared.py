"""What a process' routers (cluster/router.py) share with its ingress (cluster/remote.py).

Ray Serve pickles the router's module by value into each process holding a handle, so these live
here, imported by reference: one ``Route`` type, one ``CLUSTER`` per process.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Route:
    """What the router reads from a call (the ``route`` keyword of ``generate``)."""

    chain: tuple[bytes, ...]  # the prompt's block hashes, truncated (replica.HASH_PREFIX_BYTES)
    cache_key: str | None
    tokens: int  # prompt + max new tokens: the work it adds to a replica


@dataclass
class ClusterState:
    """What the routers of this process saw, for the ingress' metrics and snapshot (thread-safe)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # replica -> its latest routing stats
    decisions: Counter[tuple[str, str]] = field(default_factory=Counter)  # (replica, reason) -> requests
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> replicas dropped from the index
    # the monotonic counters of replicas that are gone, so the cluster's sums never go backwards
    retired: dict[str, Counter[str]] = field(default_factory=dict)  # "counters" | "finished" | ... -> sums

    def retire(self, stats: dict[str, Any]) -> None:  # with the lock held
        for key in ("finished", "reuse_stops", "cached_tokens_by_tier"):
            self.retired.setdefault(key, Counter()).update(stats.get(key) or {})
        counters = stats.get("counters") or {}
        self.retired.setdefault("counters", Counter()).update(
            {k: v for k, v in counters.items() if k in MONOTONIC_COUNTERS})

    def snapshot(self) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], int], dict[str, int],
                                dict[str, dict[str, int]]]:
        with self.lock:
            return (dict(self.stats), dict(self.decisions), dict(self.dropped),
                    {k: dict(v) for k, v in self.retired.items()})


# engine counters that only grow (the others — blocks, requests running — are gauges)
MONOTONIC_COUNTERS = frozenset({"requests_added", "prompt_tokens", "cached_tokens", "computed_tokens",
                                "generated_tokens", "cache_write_tokens", "preemptions", "blocks_evicted",
                                "early_evictions"})

CLUSTER = ClusterState()
