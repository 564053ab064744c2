"""One KV block's bookkeeping: id, references, content hash, retention, LRU links."""

from __future__ import annotations

from dataclasses import dataclass, field

from promptcache.cache.hashing import BlockHash


@dataclass(eq=False, slots=True)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    ttl_s: float = 0.0  # retention asked for this block's content; a release keeps it that long
    expires_at: float = 0.0  # while free: retained until then (0 = not retained)
    last_used: float = 0.0
    heap_token: int = -1  # matches the live heap entry while the block sits in the retained heap
    retention_ended: bool = False  # its retention ran out while it was free (an eviction then "expired" it)
    prev: Block | None = field(default=None, repr=False)
    next: Block | None = field(default=None, repr=False)
    in_lru: bool = False
