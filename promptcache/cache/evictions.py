"""What became of content that is no longer cached: a bounded record of recently dropped blocks.

A miss is only explainable if the server remembers that a block *was* cached: evicted for room
(memory too small), expired (its retention ended, then it was evicted), or dropped by a reset. The
record maps a dropped block's content hash to when and why, bounded (oldest forgotten first), so a
diagnosis can say "evicted 42 s after its last use" instead of "not cached". Hashes are namespaced
by tenant (cache/namespace.py), so a record never tells one tenant about another's content.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from promptcache.cache.hashing import BlockHash

EVICTED, EXPIRED, RESET = "evicted", "expired", "reset"


@dataclass(frozen=True, slots=True)
class Dropped:
    reason: str  # EVICTED | EXPIRED | RESET
    at: float  # clock time it was dropped
    last_used: float  # clock time a request last released it


class EvictionLog:
    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._records: OrderedDict[BlockHash, Dropped] = OrderedDict()

    def record(self, block_hash: BlockHash, reason: str, at: float, last_used: float) -> None:
        if self.capacity == 0:
            return
        self._records[block_hash] = Dropped(reason, at, last_used)
        self._records.move_to_end(block_hash)
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)

    def cached_again(self, block_hash: BlockHash) -> None:
        """The content is cached once more: an older drop no longer explains anything."""
        self._records.pop(block_hash, None)

    def lookup(self, block_hash: BlockHash) -> Dropped | None:
        return self._records.get(block_hash)

    def __len__(self) -> int:
        return len(self._records)
