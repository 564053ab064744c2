"""Plain records the engine hands out about itself (no engine object crosses to the server)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from promptcache.tokenizer import Tokenizer


@dataclass(frozen=True)
class EngineInfo:
    """Facts about an engine that never change while it runs (safe to read from any thread)."""

    model_name: str
    max_model_len: int  # tokens of context
    block_size: int  # tokens per KV block
    num_blocks: int  # KV blocks in the pool
    precision: str  # e.g. "cpu, bfloat16 math (native), bfloat16 KV cache"
    tokenizer: Tokenizer
    vocab_size: int  # the model's: token ids in [0, vocab_size)
    tiers: tuple[str, ...] = ()  # lower tiers in lookup order ("disk", "redis")

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size


@dataclass(frozen=True)
class EngineStats:
    """A consistent snapshot of the engine's counters, taken between two steps."""

    counters: dict[str, int]  # LLMEngine.stats(): tokens, blocks, requests, evictions, preemptions
    finished: dict[str, int]  # finished requests by finish reason
    reuse_stops: dict[str, int]  # admitted requests by why prefix reuse ended (cache.ReuseStop.reason)
    tiers: dict[str, dict[str, Any]] = field(default_factory=dict)  # per lower tier (LLMEngine.tier_stats)
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)  # cached tokens loaded from each
    # a cluster's ingress (cluster/remote.py) also reports, from its routers: each replica's counters,
    # requests routed by (replica, reason), and replicas dropped from the routing index by why
    replicas: dict[str, dict[str, int]] = field(default_factory=dict)
    routing: dict[tuple[str, str], int] = field(default_factory=dict)
    dropped_replicas: dict[str, int] = field(default_factory=dict)
