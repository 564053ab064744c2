"""Our routing policy as the engine deployment's Ray Serve request router.

Ray Serve runs one router per process that holds a handle to the engine deployment (the ingress),
on its own thread. Each call carries a ``Route`` (the request's block-hash chain, its
``prompt_cache_key`` and its size, computed once at the ingress); each replica's
``record_routing_stats`` (polled by Serve every ``STATS_PERIOD_S``) says what it holds and how
loaded it is. Between polls the router keeps its own optimistic record (a routed chain counts as
held there for ``OPTIMISTIC_TTL_S``) and counts the tokens it has in flight per replica, streams
included, until they complete. A replica that dies is dropped from both at once.

``mode`` picks the policy: ``"policy"`` (cluster/policy.py ``rank``), or the baselines the bench
compares it with, ``"round_robin"`` and ``"prefix_hash"`` (a hash of the first 256 tokens and the
key, as hosted providers route; no load).
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from promptcache.cache.hashing import BlockHash
from promptcache.cluster import shared
from promptcache.cluster.policy import Costs, HotPrefixes, Replica, ReplicaIndex, rank

# Serve pickles this module *by value* into every handle owner: what the router shares with the
# ingress (the Route type, the ClusterState) lives in cluster/shared.py and is reached through the
# module, so both sides see the same objects.

MODES = ("policy", "round_robin", "prefix_hash")  # server/config.py ROUTING_MODES names them for the CLI
STATS_PERIOD_S = 0.5
OPTIMISTIC_TTL_S = 30.0
HELD_TTL_S = 3600.0  # a replica's report is replaced by the next one; the TTL only bounds a stale one


def name_of(replica_id: ReplicaID) -> str:
    return replica_id.unique_id


class CacheAwareRouter(RequestRouter):
    def initialize_state(self, mode: str = "policy", block_size: int = 16, **costs: Any) -> None:
        if mode not in MODES:
            raise ValueError(f"routing mode must be one of {MODES}, got {mode!r}")
        self.mode, self.block_size = mode, block_size
        self.costs = Costs(**costs)
        self.held = ReplicaIndex(ttl_s=HELD_TTL_S)
        self.optimistic = ReplicaIndex(ttl_s=OPTIMISTIC_TTL_S)
        self.hot = HotPrefixes()
        self.turn = itertools.count()
        self.inflight: dict[str, dict[str, int]] = {}  # replica -> internal request id -> tokens
        # internal request id -> why it was ranked so, until it is routed (Serve may ask again:
        # backoff rounds, a replica that refused it; only the routing that happened is counted)
        self.reasons: dict[str, str] = {}
        self.lock = threading.Lock()

    # ---- what replicas hold -------------------------------------------------------------------

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        names = set()
        with self.lock, shared.CLUSTER.lock:
            for r in replicas:
                name = name_of(r.replica_id)
                names.add(name)
                stats = r.routing_stats or {}
                if "held" in stats:
                    self.held.drop(name)
                    self.held.added(name, [BlockHash(h) for h in stats["held"]])
                    shared.CLUSTER.stats[name] = stats
            for gone in set(shared.CLUSTER.stats) - names:
                self._drop(gone, "removed")

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        with self.lock, shared.CLUSTER.lock:
            self._drop(name_of(replica_id), "died")

    def _drop(self, name: str, why: str) -> None:  # with both locks held
        self.held.drop(name)
        self.optimistic.drop(name)
        self.inflight.pop(name, None)
        stats = shared.CLUSTER.stats.pop(name, None)
        if stats is not None:
            shared.CLUSTER.dropped[why] += 1
            shared.CLUSTER.retire(stats)

    # ---- choosing -----------------------------------------------------------------------------

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all full: wait, do not spin
        route = pending_request.kwargs.get("route") if pending_request is not None else None
        if not isinstance(route, shared.Route) or not candidate_replicas:
            return [candidate_replicas]
        by_name = {name_of(r.replica_id): r for r in candidate_replicas}
        rid = pending_request.metadata.internal_request_id if pending_request is not None else ""
        with self.lock:
            again = rid in self.reasons
            order, reason = self._order(route, by_name, count_hot=not again)
            self.reasons[rid] = reason
            while len(self.reasons) > 100_000:  # requests Serve never routed (cancelled while waiting)
                del self.reasons[next(iter(self.reasons))]
        return [[by_name[n]] for n in order]

    def _order(self, route: shared.Route, by_name: dict[str, RunningReplica],
               count_hot: bool = True) -> tuple[list[str], str]:
        names = sorted(by_name)
        if self.mode == "round_robin":
            start = next(self.turn) % len(names)
            return names[start:] + names[:start], "round_robin"
        if self.mode == "prefix_hash":
            head = route.chain[min(len(route.chain), self.costs.hot_prefix_blocks) - 1] if route.chain else b""
            digest = hashlib.blake2b(head + (route.cache_key or "").encode(), digest_size=8).digest()
            start = int.from_bytes(digest, "little") % len(names)
            return names[start:] + names[:start], "prefix_hash"
        chain = [BlockHash(h) for h in route.chain]
        index = _Either(self.held, self.optimistic)
        replicas = [Replica(n, self._load(n, by_name[n])) for n in names]
        choices = rank(chain, route.cache_key, replicas, index, self.block_size, costs=self.costs,
                       hot=self.hot if count_hot else None)
        return [c.name for c in choices], choices[0].reason

    def _load(self, name: str, replica: RunningReplica) -> int:
        """Tokens of work on a replica: what it reported, or what this router has sent it since
        (streams count until they complete), whichever is larger."""
        reported = int((replica.routing_stats or {}).get("load_tokens", 0))
        return max(reported, sum(self.inflight.get(name, {}).values()))

    # ---- bookkeeping of routed requests ---------------------------------------------------------

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        route = pending_request.kwargs.get("route")
        if not isinstance(route, shared.Route):
            return
        name, rid = name_of(replica_id), pending_request.metadata.internal_request_id
        chain = [BlockHash(h) for h in route.chain]
        with self.lock:
            # the work it brings there: what that replica does not hold yet, and what it will generate
            held = _Either(self.held, self.optimistic).matched(name, chain) * self.block_size
            self.inflight.setdefault(name, {})[rid] = max(0, route.tokens - held)
            self.optimistic.added(name, chain)
            reason = self.reasons.pop(rid, "fallback")
        with shared.CLUSTER.lock:
            shared.CLUSTER.decisions[(name, reason)] += 1  # the replica it went to, not the one ranked first

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        with self.lock:
            self.inflight.get(name_of(replica_id), {}).pop(internal_request_id, None)


class _Either:
    """Held by a replica's report or by the router's optimistic record: the longer match wins."""

    def __init__(self, *indexes: ReplicaIndex) -> None:
        self.indexes = indexes

    def matched(self, replica: str, chain: Sequence[BlockHash]) -> int:
        return max(i.matched(replica, chain) for i in self.indexes)
