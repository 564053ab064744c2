"""The ingress' engine: what the server uses of an ``AsyncEngine``, over a Ray Serve handle to the
engine deployment. The server's dialects, auth, tokenizing and history run unchanged in the
ingress; each request's block-hash chain is computed here, once, with the engines' own namespace
and seed, and travels with the call for the router (``router.Route``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import RayActorError, RayTaskError

from promptcache.cache.hashing import hash_blocks
from promptcache.cluster.replica import HASH_PREFIX_BYTES, ReplicaFacts
from promptcache.cluster.shared import CLUSTER, Route
from promptcache.engine.api import EngineDead, EngineInfo, EngineStats, RequestOutput, RequestSpec
from promptcache.tokenizer import Tokenizer

SUMMED_STATS = ("counters", "finished", "reuse_stops", "cached_tokens_by_tier")
SHARED_GAUGES = frozenset({"objects", "bytes_stored", "circuit_open"})


class RemoteEngine:
    supports_pins = False  # a pin would hold one replica's blocks while requests go to any

    def __init__(self, handle: Any, facts: ReplicaFacts) -> None:
        self.handle = handle
        self.facts = facts
        f = facts
        self.info = EngineInfo(f.model_name, f.max_model_len, f.block_size, f.num_blocks, f.precision,
                               Tokenizer(f.model_dir), f.vocab_size, f.tiers)
        self.error: BaseException | None = None

    @property
    def is_alive(self) -> bool:
        return True  # Serve replaces a dead replica; requests wait for one meanwhile

    def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def route_of(self, spec: RequestSpec) -> Route:
        root = self.facts.namespace.root(spec.tenant)
        chain = hash_blocks(root, spec.prompt_token_ids, self.info.block_size, seed=self.facts.hash_seed)
        return Route(tuple(h[:HASH_PREFIX_BYTES] for h in chain), spec.cache_key,
                     len(spec.prompt_token_ids) + spec.params.max_tokens)

    async def generate(self, spec: RequestSpec) -> AsyncIterator[RequestOutput]:
        stream = self.handle.options(stream=True).generate.remote(spec, route=self.route_of(spec))
        try:
            async for out in stream:
                yield out
        except RayTaskError as e:  # the engine refused it (ValueError, EngineOverloaded): its own error
            cause = e.cause
            raise (cause if isinstance(cause, Exception) else EngineDead(str(e))) from None
        except RayActorError as e:
            raise EngineDead(f"the replica serving {spec.request_id} died ({type(e).__name__})") from None
        finally:
            stream.cancel()  # a client that went away: the replica aborts the request, its blocks go free

    def snapshot(self) -> EngineStats:
        """Every replica's counters summed, as they last reported them (``router.STATS_PERIOD_S``
        old at most), with the per-replica rows and the routing decisions of this process."""
        stats, decisions, dropped, retired = CLUSTER.snapshot()
        summed: dict[str, dict[str, Any]] = {k: dict(retired.get(k, {})) for k in SUMMED_STATS}
        tiers: dict[str, dict[str, Any]] = {}
        for row in stats.values():
            for key in SUMMED_STATS:
                for name, value in (row.get(key) or {}).items():
                    summed[key][name] = summed[key].get(name, 0) + value
            for tier, values in (row.get("tiers") or {}).items():
                mine = tiers.setdefault(tier, {})
                for name, value in values.items():
                    if not isinstance(value, int | float):
                        continue
                    # what a shared store holds (every replica's disk tier is the same directory) is
                    # seen alike by each: not a sum
                    mine[name] = max(mine.get(name, 0), value) if name in SHARED_GAUGES else mine.get(name, 0) + value
        counters = {k: int(summed["counters"].get(k, 0)) for k in _COUNTER_KEYS} | summed["counters"]
        replicas = {name: dict(row.get("counters") or {}) for name, row in stats.items()}
        return EngineStats(counters, summed["finished"], summed["reuse_stops"], tiers, summed["cached_tokens_by_tier"],
                           replicas=replicas, routing=decisions, dropped_replicas=dropped)

    def pin(self, pin_id: str, tenant: str | None, token_ids: list[int], ttl_s: float) -> int:
        raise NotImplementedError("cached contents are not available with --replicas yet: a pin would hold the "
                                  "blocks of one replica while requests go to any")

    def repin(self, pin_id: str, ttl_s: float) -> bool:
        raise NotImplementedError("cached contents are not available with --replicas yet")

    def unpin(self, pin_id: str) -> None:
        pass  # nothing is ever pinned here


# what an engine's stats always have (a fresh cluster, before any replica reported, shows zeros)
_COUNTER_KEYS = ("requests_added", "requests_running", "requests_waiting", "prompt_tokens", "cached_tokens",
                 "computed_tokens", "generated_tokens", "cache_write_tokens", "preemptions", "blocks_pinned",
                 "blocks_total", "blocks_in_use", "blocks_cached", "blocks_empty", "blocks_evicted", "early_evictions")
