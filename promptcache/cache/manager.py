"""Which KV blocks each request uses: prefix matching, allocation, commit, release.

The manager owns every request's block table (a list of blocks, in token order) and the
"inflight" map that lets a request see that blocks it wants are being computed right now by
another request (in-flight sharing). It never sees tensors.

Index arithmetic for one request, in tokens::

    [0, cached) reused | [cached, computed) done | [computed, n) still to run
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from promptcache.cache.block_pool import Block, BlockPool
from promptcache.cache.hashing import BlockHash
from promptcache.cache.index import PREFIX_INDEXES, PrefixIndex


class IntegrityError(AssertionError):
    """The cache's bookkeeping broke an invariant (a bug, never the caller's input)."""


MAX_TTL_S = 30 * 86400.0  # the longest a block may be kept after its last use


@dataclass(frozen=True)
class Retention:
    """How long each block of a request stays cached after its last use.

    ``default_ttl_s`` covers every block; a breakpoint ``(end_token, ttl_s)`` covers the full blocks
    ending at or before ``end_token`` (Anthropic's ``cache_control`` on a block). A block takes the
    longest ttl among what covers it.
    """

    default_ttl_s: float = 0.0
    breakpoints: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        for ttl in (self.default_ttl_s, *(t for _, t in self.breakpoints)):
            if not 0 <= ttl <= MAX_TTL_S:  # also rejects NaN and inf
                raise ValueError(f"ttl must be between 0 and {MAX_TTL_S:.0f} seconds, got {ttl!r}")

    def ttl_for_block(self, block_index: int, block_size: int) -> float:
        block_end = (block_index + 1) * block_size
        ttl = self.default_ttl_s
        for end_token, bp_ttl in self.breakpoints:
            if block_end <= end_token:
                ttl = max(ttl, bp_ttl)
        return ttl


NO_RETENTION = Retention()


# Why reuse ended where it did (ReuseStop.reason): everything reusable was reused; the next block
# is being computed by another request; it was cached once (evicted / expired / reset: see
# cache/evictions.py); or it was never cached in this namespace (the prompt diverges from
# everything stored, or nothing stored it yet).
REUSED_ALL, IN_FLIGHT, NOT_CACHED = "reused_all", "in_flight", "not_cached"
BELOW_ONE_BLOCK = "below_one_block"  # the prompt has no whole block before its last token: nothing to reuse


@dataclass(frozen=True)
class ReuseStop:
    reason: str  # REUSED_ALL | BELOW_ONE_BLOCK | IN_FLIGHT | EVICTED | EXPIRED | RESET | NOT_CACHED
    token: int  # the first prompt token that was not reused (whole blocks before it were)
    idle_s: float | None = None  # EVICTED / EXPIRED / RESET: unused this long before it was dropped
    ago_s: float | None = None  # ... and dropped this long before the lookup


@dataclass(frozen=True)
class CacheHit:
    blocks: tuple[Block, ...]
    num_tokens: int  # reused tokens (whole blocks)
    num_inflight_blocks: int  # blocks right after the hit that another request is computing now
    stop: ReuseStop = ReuseStop(REUSED_ALL, 0)


@dataclass
class _Table:
    blocks: list[Block] = field(default_factory=list)
    num_committed_blocks: int = 0
    retention: Retention = NO_RETENTION
    promised: list[BlockHash] = field(default_factory=list)  # blocks it computes that others wait for


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        index: str = "hash",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if index not in PREFIX_INDEXES:
            raise ValueError(f"unknown prefix index {index!r}; known: {', '.join(PREFIX_INDEXES)}")
        self.block_size = block_size
        self.index: PrefixIndex = PREFIX_INDEXES[index]()  # "none": caching off, a null object
        self.pool = BlockPool(num_blocks, clock, self.index)
        self.tables: dict[str, _Table] = {}

    # ---- queries -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.tables[request_id].blocks]

    def match(self, request_id: str, block_hashes: Sequence[BlockHash], num_tokens: int) -> CacheHit:
        """Longest run of cached full blocks at the start of the request's tokens.

        Capped so that at least the last token is computed: its logits are needed to sample.
        """
        max_hit_blocks = (num_tokens - 1) // self.block_size  # the last token must run
        hit: list[Block] = []
        for h in block_hashes[:max_hit_blocks]:
            block = self.index.lookup(h)
            if block is None:
                break
            hit.append(block)
        inflight = 0
        for h in block_hashes[len(hit) : max_hit_blocks]:
            owner = self.index.owner(h)
            if owner is None or owner == request_id:
                break
            inflight += 1
        num_tokens_hit = len(hit) * self.block_size
        return CacheHit(tuple(hit), num_tokens_hit, inflight,
                        self._stop(block_hashes, len(hit), max_hit_blocks, inflight, num_tokens_hit))

    def join_inflight(self, block_hashes: Sequence[BlockHash], num_tokens: int, hit: CacheHit,
                      computed_after_step: Mapping[str, int]) -> CacheHit | None:
        """``hit`` extended over the in-flight blocks right after it, when the current step computes
        every one of them; None when one is not (the request keeps waiting for it).

        ``computed_after_step[owner]``: the tokens each request of this step will have computed when
        it ends (an owner missing from it is not in the step). A request that joins runs in the same step as its owners:
        each layer writes all of a step's K/V before attention reads any, so it reads their fresh
        K/V in place instead of waiting a step for them. The blocks stay the owners' to index.
        """
        blocks = list(hit.blocks)
        for i in range(len(hit.blocks), len(hit.blocks) + hit.num_inflight_blocks):
            owner = self.index.owner(block_hashes[i])
            table = self.tables.get(owner) if owner is not None else None
            if owner is None or table is None or len(table.blocks) <= i:
                return None
            if computed_after_step.get(owner, 0) < (i + 1) * self.block_size:
                return None
            blocks.append(table.blocks[i])
        if len(blocks) == len(hit.blocks):
            return None
        n = len(blocks) * self.block_size
        max_hit_blocks = (num_tokens - 1) // self.block_size
        return CacheHit(tuple(blocks), n, 0, self._stop(block_hashes, len(blocks), max_hit_blocks, 0, n))

    def _stop(self, block_hashes: Sequence[BlockHash], num_hit: int, max_hit_blocks: int, inflight: int,
              token: int) -> ReuseStop:
        if max_hit_blocks <= 0:
            return ReuseStop(BELOW_ONE_BLOCK, 0)
        if num_hit >= min(max_hit_blocks, len(block_hashes)):
            return ReuseStop(REUSED_ALL, token)
        if inflight:
            return ReuseStop(IN_FLIGHT, token)
        dropped = self.pool.evictions.lookup(block_hashes[num_hit])
        if dropped is not None:
            return ReuseStop(dropped.reason, token, max(0.0, dropped.at - dropped.last_used),
                             max(0.0, self.pool.clock() - dropped.at))
        return ReuseStop(NOT_CACHED, token)

    # ---- allocation ----------------------------------------------------------------------------

    def allocate(
        self,
        request_id: str,
        num_tokens: int,
        hit: CacheHit | None = None,
        retention: Retention = NO_RETENTION,
        inflight_hashes: Sequence[BlockHash] = (),
    ) -> list[int] | None:
        """Make the request's block table cover ``num_tokens`` tokens; None (and no change) if full.

        The first call for a request passes its ``hit``: those blocks are pinned and start the table.
        ``inflight_hashes`` are the full prompt blocks this request will compute; other requests that
        want them wait (``CacheHit.num_inflight_blocks``) instead of computing them a second time.
        The caller owns the table until it calls ``free(request_id)``, which it must do on finish,
        abort and preemption alike.
        """
        table = self.tables.get(request_id)
        hit_blocks = hit.blocks if (hit is not None and table is None) else ()
        have = len(table.blocks) if table is not None else len(hit_blocks)
        num_new = max(0, self.blocks_needed(num_tokens) - have)
        # pinning a hit block that sits in the free queues takes it out of them
        hit_from_free = sum(1 for b in hit_blocks if b.ref_cnt == 0)
        if num_new > self.pool.num_free_blocks - hit_from_free:
            return None
        if table is None:
            table = self.tables[request_id] = _Table(retention=retention)
            for i, block in enumerate(hit_blocks):
                self.pool.touch(block, retention.ttl_for_block(i, self.block_size))
            table.blocks.extend(hit_blocks)
            table.num_committed_blocks = len(hit_blocks)
        for h in inflight_hashes:
            if self.index.promise(h, request_id):
                table.promised.append(h)
        fresh = []
        for _ in range(num_new):
            taken = self.pool.take_new()
            assert taken is not None  # capacity was checked above
            fresh.append(taken)
        # in ascending ids: blocks freed together (tail-first, so evicted deepest-first) come back as
        # consecutive ids, and attention reads a run of consecutive blocks in one call
        fresh.sort(key=lambda b: b.block_id)
        table.blocks.extend(fresh)
        return [b.block_id for b in fresh]

    def commit(self, request_id: str, block_hashes: Sequence[BlockHash], num_computed_tokens: int) -> list[int]:
        """Index the request's blocks that are now full and computed; return the newly indexed indices.

        An index is left out when another block already holds the same content (two requests that
        computed it at once): that copy stays private and returns to the pool on free.
        """
        table = self.tables[request_id]
        num_full = min(num_computed_tokens // self.block_size, len(block_hashes), len(table.blocks))
        newly: list[int] = []
        for i in range(table.num_committed_blocks, num_full):
            h = block_hashes[i]
            self.index.settle(h, request_id)
            block = table.blocks[i]
            block.ttl_s = max(block.ttl_s, table.retention.ttl_for_block(i, self.block_size))
            if self.index.insert(block, h):
                self.pool.evictions.cached_again(h)
                newly.append(i)
        table.num_committed_blocks = max(table.num_committed_blocks, num_full)
        return newly

    def settle_promises(self, request_id: str) -> None:
        """Withdraw every promise the table still holds (its blocks stay): others stop waiting."""
        table = self.tables.get(request_id)
        if table is None:
            return
        for h in table.promised:
            self.index.settle(h, request_id)
        table.promised.clear()

    def free(self, request_id: str) -> None:
        """Release the request's blocks tail-first, so its deepest blocks are evicted first."""
        table = self.tables.pop(request_id, None)
        if table is None:
            return
        for h in table.promised:
            self.index.settle(h, request_id)
        for block in reversed(table.blocks):
            self.pool.release(block)

    def reset_prefix_cache(self) -> int:
        self.index.clear()
        for table in self.tables.values():
            table.promised.clear()
        return self.pool.drop_all_hashes()

    # ---- invariants ----------------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Raise ``IntegrityError`` unless every block is in exactly one place and counts agree.

        Explicit checks, not ``assert``: they must hold under ``python -O`` too (the async engine
        decides from this whether it may keep serving after a failed step)."""
        pool = self.pool
        where: dict[int, str] = {}

        def place(block: Block, name: str) -> None:
            if block.block_id in where:
                raise IntegrityError(f"block {block.block_id} in {where[block.block_id]} and {name}")
            where[block.block_id] = name

        for b in pool.empty:
            if not (b.ref_cnt == 0 and b.block_hash is None):
                raise IntegrityError(f"empty block {b} has ref or hash")
            place(b, "empty")
        for b in pool.lru:
            if not (b.ref_cnt == 0 and b.block_hash is not None):
                raise IntegrityError(f"lru block {b} has ref or no hash")
            place(b, "lru")
        live = [entry[2] for entry in pool.retained if entry[1] == entry[2].heap_token]
        if not (len(live) == pool.num_retained):
            raise IntegrityError(f"retained count {pool.num_retained} != {len(live)}")
        for r in live:
            if not (r.ref_cnt == 0 and r.block_hash is not None):
                raise IntegrityError(f"retained block {r} has ref or no hash")
            place(r, "retained")
        refs: dict[int, int] = {}
        for table in self.tables.values():
            for b in table.blocks:
                refs[b.block_id] = refs.get(b.block_id, 0) + 1
        for b in pool.blocks:
            if not (b.ref_cnt == refs.get(b.block_id, 0)):
                raise IntegrityError(f"block {b.block_id} ref {b.ref_cnt} != tables")
            if b.ref_cnt:
                place(b, "in use")
        if not (len(where) == pool.num_blocks):
            raise IntegrityError(f"{pool.num_blocks - len(where)} blocks are nowhere")
        for h, b in self.index.entries():
            if not (b.block_hash == h):
                raise IntegrityError(f"hash map entry for block {b.block_id} disagrees")
        hashed = sum(1 for b in pool.blocks if b.block_hash is not None)
        if not (hashed == len(self.index)):
            raise IntegrityError(f"{hashed} hashed blocks but {len(self.index)} indexed")
        for h, owner in self.index.promises():
            if not (owner in self.tables and h in self.tables[owner].promised):
                raise IntegrityError("stale in-flight entry")

    def stats(self) -> dict[str, int]:
        pool = self.pool
        in_use = sum(1 for b in pool.blocks if b.ref_cnt)
        return {
            "blocks_total": pool.num_blocks,
            "blocks_in_use": in_use,
            "blocks_cached": len(pool.lru) + pool.num_retained,
            "blocks_empty": len(pool.empty),
            "blocks_evicted": pool.counters.blocks_evicted,
            "early_evictions": pool.counters.early_evictions,
        }
