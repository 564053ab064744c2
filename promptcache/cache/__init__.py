"""Torch-free KV block bookkeeping: content hashes, the block pool, the prefix-matching manager."""

from promptcache.cache.block import Block
from promptcache.cache.block_pool import BlockPool
from promptcache.cache.hashing import BlockHash, hash_block, hash_blocks, namespace_hash
from promptcache.cache.manager import MAX_TTL_S, NO_RETENTION, CacheHit, IntegrityError, KVCacheManager, Retention

__all__ = [
    "MAX_TTL_S",
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
