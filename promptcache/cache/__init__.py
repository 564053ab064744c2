"""Torch-free KV block bookkeeping: content hashes, the block pool, the prefix-matching manager."""

from promptcache.cache.block_pool import Block, BlockPool
from promptcache.cache.hashing import BlockHash, hash_block, hash_blocks, namespace_hash
from promptcache.cache.manager import (
    NO_RETENTION,
    RETENTION_NAMES,
    CacheHit,
    KVCacheManager,
    Retention,
    parse_ttl,
)

__all__ = [
    "NO_RETENTION",
    "RETENTION_NAMES",
    "Block",
    "BlockHash",
    "BlockPool",
    "CacheHit",
    "KVCacheManager",
    "Retention",
    "hash_block",
    "hash_blocks",
    "namespace_hash",
    "parse_ttl",
]
