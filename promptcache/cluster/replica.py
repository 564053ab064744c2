"""One engine replica as the cluster sees it, Ray-free (``serve_app.py`` makes it a deployment).

It runs an ``AsyncEngine`` and answers: generate a request (each output names the replica), what
the router should know (``routing_stats``: load, the hashes of its recently used cached blocks,
its counters for the ingress' metrics), and the facts the ingress needs to tokenize and hash
requests itself (``describe``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from promptcache.engine.api import AsyncEngine, RequestOutput, RequestSpec

HASH_PREFIX_BYTES = 8  # a held block is named by the first bytes of its hash: a routing hint, not an address
MAX_HELD = 4096  # most recently used blocks a replica reports


@dataclasses.dataclass(frozen=True)
class ReplicaFacts:
    """What the ingress needs from the engines: their info (the tokenizer as a directory to load
    it from), and how they hash prompts. Plain data: it crosses processes."""

    model_name: str
    max_model_len: int
    block_size: int
    num_blocks: int
    precision: str
    model_dir: str
    vocab_size: int
    tiers: tuple[str, ...]
    namespace: Any  # cache.namespace.Namespace (torch-free): its root(tenant) starts every chain
    hash_seed: bytes


class EngineReplica:
    def __init__(self, aengine: AsyncEngine, name: str) -> None:
        self.aengine, self.name = aengine, name

    def describe(self) -> ReplicaFacts:
        e, i = self.aengine.engine, self.aengine.info
        return ReplicaFacts(i.model_name, i.max_model_len, i.block_size, i.num_blocks, i.precision,
                            str(e.runner.model_dir), i.vocab_size, i.tiers, e.namespace, e.config.cache.hash_seed)

    async def generate(self, spec: RequestSpec) -> AsyncIterator[RequestOutput]:
        async for out in self.aengine.generate(spec):  # closing this generator aborts the request
            yield dataclasses.replace(out, served_by=self.name)

    def routing_stats(self) -> dict[str, Any]:
        """Small and plain (it is broadcast to every router whenever it changes)."""
        def take(e: Any) -> tuple[dict[str, Any], Any]:
            return e.routing_summary(MAX_HELD, HASH_PREFIX_BYTES), e.snapshot()

        summary, snap = self.aengine.call(take)
        return {"replica": self.name, **summary, "counters": snap.counters, "finished": snap.finished,
                "reuse_stops": snap.reuse_stops, "tiers": snap.tiers,
                "cached_tokens_by_tier": snap.cached_tokens_by_tier}
