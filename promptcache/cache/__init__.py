"""Torch-free KV block bookkeeping: content hashes, the block pool, the prefix-matching manager."""

from promptcache.cache.block import Block
from promptcache.cache.block_pool import BlockPool
from promptcache.cache.evictions import EVICTED, EXPIRED, RESET, Dropped, EvictionLog
from promptcache.cache.hashing import BlockHash, hash_block, hash_blocks, namespace_hash
from promptcache.cache.manager import (
    BELOW_ONE_BLOCK,
    IN_FLIGHT,
    MAX_TTL_S,
    NO_RETENTION,
    NOT_CACHED,
    REUSED_ALL,
    CacheHit,
    IntegrityError,
    KVCacheManager,
    Retention,
    ReuseStop,
)

__all__ = [
    "BELOW_ONE_BLOCK",
    "EVICTED",
    "EXPIRED",
    "IN_FLIGHT",
    "MAX_TTL_S",
    "NOT_CACHED",
    "RESET",
    "REUSED_ALL",
    "Dropped",
    "EvictionLog",
    "ReuseStop",
    "NO_RETENTION",
    "Block",
    "BlockHash",
    "BlockPool",
    "CacheHit",
    "IntegrityError",
    "KVCacheManager",
    "Retention",
    "hash_block",
    "hash_blocks",
    "namespace_hash",
]
