"""All KV blocks and where each one is: empty, cached-and-evictable, retained, or in use.

Pure bookkeeping (ids, hashes, reference counts, LRU links, expiry); the K/V bytes live in the
model runner's tensors, addressed by ``block_id``.

A block is in exactly one place:

    empty       ref 0, no hash            stack, handed out first (costs no eviction)
    lru         ref 0, hash, unretained   intrusive doubly linked list, oldest release first
    retained    ref 0, hash, expires > now  heap by expiry (deepest block first on ties)
    in use      ref > 0                   owned by requests' block tables

Eviction order when a block is needed: empty, then ``lru`` (expired retained blocks rejoin it in
last-use order), then ``retained`` by earliest expiry — each of those counts as an early eviction.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from promptcache.cache.block import Block
from promptcache.cache.evictions import EVICTED, EXPIRED, RESET, EvictionLog
from promptcache.cache.hashing import BlockHash
from promptcache.cache.index import PrefixIndex


class LRUList:
    """Doubly linked list of blocks with O(1) append and O(1) removal from the middle."""

    def __init__(self) -> None:
        self.head = Block(-1)  # sentinels: head.next is the least recently used
        self.tail = Block(-1)
        self.head.next, self.tail.prev = self.tail, self.head
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[Block]:
        node = self.head.next
        while node is not None and node is not self.tail:
            yield node
            node = node.next

    def _insert_before(self, anchor: Block, block: Block) -> None:
        prev = anchor.prev
        assert prev is not None and not block.in_lru
        prev.next, block.prev, block.next, anchor.prev = block, prev, anchor, block
        block.in_lru = True
        self.size += 1

    def append(self, block: Block) -> None:
        self._insert_before(self.tail, block)

    def insert_by_last_used(self, block: Block) -> None:
        """Place ``block`` where its ``last_used`` puts it (used for expired retained blocks)."""
        node = self.head.next
        while node is not self.tail and node is not None and node.last_used <= block.last_used:
            node = node.next
        assert node is not None
        self._insert_before(node, block)

    def remove(self, block: Block) -> None:
        assert block.in_lru and block.prev is not None and block.next is not None
        block.prev.next, block.next.prev = block.next, block.prev
        block.prev = block.next = None
        block.in_lru = False
        self.size -= 1

    def popleft(self) -> Block | None:
        first = self.head.next
        if first is self.tail or first is None:
            return None
        self.remove(first)
        return first


@dataclass
class PoolCounters:
    blocks_evicted: int = 0  # cached content dropped to make room
    early_evictions: int = 0  # ... of blocks still inside their retention


class BlockPool:
    """Where every block is. Content hashes live in the ``index`` (cache/index.py): the pool asks it
    to forget a block's content when it evicts the block."""

    def __init__(self, num_blocks: int, clock: Callable[[], float], index: PrefixIndex,
                 evictions: EvictionLog | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        # what became of dropped content, for miss diagnoses: a few times the pool, bounded
        self.evictions = evictions if evictions is not None else EvictionLog(min(4 * num_blocks, 200_000))
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.clock = clock
        self.empty: list[Block] = list(reversed(self.blocks))  # pop() hands out block 0 first
        self.lru = LRUList()
        self.retained: list[tuple[float, int, Block]] = []  # (expires_at, token, block)
        self.num_retained = 0
        self.index = index
        self.counters = PoolCounters()
        self._tokens = itertools.count()
        # called with (hash, seconds of retention left) when cached content is evicted (lower tiers
        # keep it that long: engine/tiering.py)
        self.on_evict: Callable[[BlockHash, float], None] | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take now (empty + evictable cached)."""
        return len(self.empty) + len(self.lru) + self.num_retained

    # ---- taking and releasing ------------------------------------------------------------------

    def touch(self, block: Block, ttl_s: float) -> None:
        """A request starts using a cached block: pin it and refresh its retention."""
        if block.ref_cnt == 0:
            self._unlink_free(block)
        block.ref_cnt += 1
        block.ttl_s = max(block.ttl_s, ttl_s)
        block.retention_ended = False

    def take_new(self) -> Block | None:
        """A block for new content (ref 1, no hash), evicting cached content if needed; None if full."""
        block = self.empty.pop() if self.empty else self._evict_one()
        if block is None:
            return None
        block.ref_cnt = 1
        return block

    def release(self, block: Block) -> None:
        """Drop one reference; an unreferenced block becomes empty, evictable, or retained."""
        assert block.ref_cnt > 0, f"block {block.block_id} released more often than taken"
        block.ref_cnt -= 1
        if block.ref_cnt:
            return
        now = self.clock()
        block.last_used = now
        if block.block_hash is None:
            block.ttl_s = 0.0
            self.empty.append(block)
        elif block.ttl_s > 0:
            block.expires_at = now + block.ttl_s
            block.heap_token = next(self._tokens)
            heapq.heappush(self.retained, (block.expires_at, block.heap_token, block))
            self.num_retained += 1
            self._compact_retained()
        else:
            self.lru.append(block)

    def drop_all_hashes(self) -> int:
        """Forget every cached prefix (``reset_prefix_cache``); returns how many were dropped."""
        dropped = len(self.index)
        now = self.clock()
        for block_hash, block in self.index.entries():
            self.evictions.record(block_hash, RESET, now, block.last_used)
            if block.ref_cnt == 0:
                self._unlink_free(block)
                self._forget(block)
                self.empty.append(block)
            else:
                self._forget(block)
        return dropped

    # ---- internals -----------------------------------------------------------------------------

    def _unlink_free(self, block: Block) -> None:
        if block.in_lru:
            self.lru.remove(block)
        elif block.heap_token >= 0:
            block.heap_token = -1  # its heap entry is now stale and skipped when popped
            block.expires_at = 0.0
            self.num_retained -= 1
        else:
            self.empty.remove(block)  # only for a hash-less block touched by mistake: rare path

    def _compact_retained(self) -> None:
        """Drop stale heap entries once they outnumber the live ones. Every hit on a retained block
        leaves its old entry behind (lazy deletion); without this, a prompt hit all day under a 24 h
        retention grew the heap by one entry per block per hit. Amortised O(1) per release; after a
        release the heap holds at most twice the retained blocks plus a small constant."""
        if len(self.retained) <= 2 * self.num_retained + 64:
            return
        self.retained = [entry for entry in self.retained if entry[1] == entry[2].heap_token]
        heapq.heapify(self.retained)

    def _expire_retained(self, now: float) -> None:
        while self.retained and self.retained[0][0] <= now:
            _, token, block = heapq.heappop(self.retained)
            if token != block.heap_token:
                continue
            block.heap_token, block.expires_at, block.ttl_s = -1, 0.0, 0.0
            block.retention_ended = True
            self.num_retained -= 1
            self.lru.insert_by_last_used(block)

    def _pop_retained(self) -> Block | None:
        while self.retained:
            _, token, block = heapq.heappop(self.retained)
            if token == block.heap_token:
                block.heap_token = -1
                self.num_retained -= 1
                return block
        return None

    def _evict_one(self) -> Block | None:
        now = self.clock()
        self._expire_retained(now)
        block = self.lru.popleft()
        if block is None:
            block = self._pop_retained()
            if block is None:
                return None
            if block.expires_at > now:
                self.counters.early_evictions += 1
        self.counters.blocks_evicted += 1
        if block.block_hash is not None:
            self.evictions.record(block.block_hash, EXPIRED if block.retention_ended else EVICTED, now,
                                  block.last_used)
            if self.on_evict is not None:
                self.on_evict(block.block_hash, max(0.0, block.expires_at - now))
        self._forget(block)
        return block

    def _forget(self, block: Block) -> None:
        self.index.remove(block)
        block.ttl_s = block.expires_at = 0.0
        block.retention_ended = False
