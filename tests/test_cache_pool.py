"""Block pool and KV cache manager: exact block ids, eviction order, retention, integrity."""

from __future__ import annotations

import pytest

from promptcache.cache import NO_RETENTION, KVCacheManager, Retention, hash_blocks, namespace_hash
from promptcache.cache.hashing import hash_block


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


ROOT = namespace_hash("model", "tenant")


def hashes(tokens: list[int], bs: int = 4):
    return hash_blocks(ROOT, tokens, bs)


def run(kv: KVCacheManager, rid: str, tokens: list[int], retention: Retention = NO_RETENTION):
    """Admit, 'compute' and commit a request the way the scheduler does; returns (hit tokens, ids)."""
    hs = hashes(tokens, kv.block_size)
    hit = kv.match(rid, hs, len(tokens))
    ids = kv.allocate(rid, len(tokens), hit, retention)
    assert ids is not None
    kv.commit(rid, hs, len(tokens))
    kv.check_integrity()
    return hit.num_tokens, kv.block_ids(rid)


def test_hashes_chain_and_namespace():
    a = hash_blocks(ROOT, list(range(8)), 4)
    b = hash_blocks(ROOT, [0, 1, 2, 3, 9, 9, 9, 9], 4)
    assert a[0] == b[0] and a[1] != b[1]
    other = hash_blocks(namespace_hash("model", "other"), list(range(8)), 4)
    assert other[0] != a[0]
    # same tokens under a different parent differ: a block's address depends on all before it
    assert hash_block(a[0], [4, 5, 6, 7]) == a[1] != hash_block(ROOT, [4, 5, 6, 7])
    # tags keep kinds apart: tenant "ab" vs tenant "a" never collide
    assert namespace_hash("m", "ab") != namespace_hash("m", "a")
    # reproducible with the same seed, different with another
    assert hash_blocks(ROOT, list(range(8)), 4) == a
    assert hash_blocks(ROOT, list(range(8)), 4, seed=b"other")[0] != a[0]


def test_match_caps_last_token_and_reports_tokens():
    kv = KVCacheManager(num_blocks=8, block_size=4, clock=Clock())
    assert run(kv, "a", list(range(8))) == (0, [0, 1])
    kv.free("a")
    # same 8 tokens: only 1 block may hit, the last token must run
    hit, ids = run(kv, "b", list(range(8)))
    assert hit == 4 and ids[0] == 0 and ids[1] != 1
    kv.free("b")
    hit, _ = run(kv, "c", list(range(9)))
    assert hit == 8


def test_free_tail_first_evicts_deepest_first():
    clock = Clock()
    kv = KVCacheManager(num_blocks=4, block_size=4, clock=clock)
    run(kv, "a", list(range(16)))  # blocks 0..3, all cached
    kv.free("a")
    assert [b.block_id for b in kv.pool.lru] == [3, 2, 1, 0]
    # a new unrelated request of 2 blocks evicts the two deepest blocks of "a" (3 and 2), and gets
    # them in ascending order: consecutive ids are one run of slots for attention
    _, ids = run(kv, "b", [100 + i for i in range(8)])
    assert ids == [2, 3]
    assert kv.pool.counters.blocks_evicted == 2
    kv.free("b")
    hit, _ = run(kv, "c", list(range(16)))  # "a"'s first two blocks are still there
    assert hit == 8


def test_blocks_freed_together_come_back_consecutive():
    """Released tail-first, evicted deepest-first, a freed table's blocks are handed out again as
    ascending, consecutive ids (not 7, 6, 5, ...: every block its own run of slots)."""
    kv = KVCacheManager(num_blocks=8, block_size=4, clock=Clock())
    run(kv, "a", list(range(32)))  # blocks 0..7, all cached
    kv.free("a")
    _, ids = run(kv, "b", [100 + i for i in range(16)])  # evicts "a"'s 4 deepest blocks
    assert ids == [4, 5, 6, 7]


def test_rehit_removes_from_middle_of_lru():
    kv = KVCacheManager(num_blocks=6, block_size=4, clock=Clock())
    run(kv, "a", list(range(4)) + [0])  # block 0 (1 full)
    kv.free("a")
    run(kv, "b", list(range(50, 54)) + [0])
    kv.free("b")
    run(kv, "c", list(range(90, 94)) + [0])
    kv.free("c")
    lru = [b.block_id for b in kv.pool.lru]  # the full first blocks of a, b, c (tails were partial)
    assert len(lru) == 3
    hit, ids = run(kv, "d", list(range(50, 54)) + [7])  # re-hit the middle one
    assert hit == 4 and ids[0] == lru[1]
    assert [b.block_id for b in kv.pool.lru] == [lru[0], lru[2]]


def test_allocate_returns_none_when_full_and_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4, clock=Clock())
    run(kv, "a", list(range(8)))
    assert kv.allocate("b", 12) is None
    assert "b" not in kv.tables
    kv.check_integrity()


def test_retention_order_and_early_evictions():
    clock = Clock()
    kv = KVCacheManager(num_blocks=4, block_size=4, clock=clock)
    run(kv, "long", list(range(4)) + [0], Retention(default_ttl_s=3600))  # block 0, 1 h
    kv.free("long")
    run(kv, "short", list(range(10, 14)) + [0], Retention(default_ttl_s=300))  # block 1, 5 min
    kv.free("short")
    run(kv, "plain", list(range(20, 24)) + [0])  # block 2, no retention
    kv.free("plain")
    assert kv.pool.num_retained == 2
    # four fresh blocks, one at a time (as decode grows a table; one allocation hands its blocks
    # out in ascending ids): empty block 3 first, then the unretained one, then earliest expiry, then 1 h
    hit = kv.match("big", hashes(list(range(100, 116))), 16)
    ids = [i for n in (4, 8, 12, 16) for i in kv.allocate("big", n, hit if n == 4 else None) or []]
    assert ids == [3, 2, 1, 0]
    assert kv.pool.counters.blocks_evicted == 3
    assert kv.pool.counters.early_evictions == 2


def test_expired_blocks_rejoin_lru_by_last_use():
    clock = Clock()
    kv = KVCacheManager(num_blocks=3, block_size=4, clock=clock)
    run(kv, "r", list(range(4)) + [0], Retention(default_ttl_s=60))  # block 0
    kv.free("r")
    clock.now += 10
    run(kv, "p", list(range(10, 14)) + [0])  # block 1, unretained, used later than block 0
    kv.free("p")
    clock.now += 100  # block 0's retention is over
    hit = kv.match("x", hashes(list(range(50, 58))), 8)
    ids = [i for n in (4, 8) for i in kv.allocate("x", n, hit if n == 4 else None) or []]
    assert ids == [2, 0]  # empty first, then block 0: expired and least recently used
    assert kv.pool.counters.early_evictions == 0


def test_hit_refreshes_retention():
    clock = Clock()
    kv = KVCacheManager(num_blocks=3, block_size=4, clock=clock)
    run(kv, "a", list(range(4)) + [0], Retention(default_ttl_s=300))
    kv.free("a")
    clock.now += 250
    hit, _ = run(kv, "b", list(range(4)) + [1])
    assert hit == 4
    kv.free("b")
    assert kv.pool.blocks[0].expires_at == clock.now + 300


def test_breakpoint_ttl_covers_blocks_before_it():
    r = Retention(default_ttl_s=0, breakpoints=((8, 3600.0), (14, 300.0)))
    assert [r.ttl_for_block(i, 4) for i in range(4)] == [3600.0, 3600.0, 300.0, 0.0]


def test_inflight_blocks_are_reported_to_others():
    kv = KVCacheManager(num_blocks=16, block_size=4, clock=Clock())
    tokens = list(range(20))
    hs = hashes(tokens)
    hit = kv.match("a", hs, 20)
    assert kv.allocate("a", 8, hit, inflight_hashes=hs[:5]) is not None
    assert kv.match("b", hs, 20).num_inflight_blocks == 4  # capped: the last token must run
    kv.commit("a", hs, 8)
    m = kv.match("b", hs, 20)
    assert (m.num_tokens, m.num_inflight_blocks) == (8, 2)
    kv.free("a")
    assert kv.match("b", hs, 20).num_inflight_blocks == 0
    kv.check_integrity()


def test_duplicate_content_is_indexed_once():
    kv = KVCacheManager(num_blocks=8, block_size=4, clock=Clock())
    tokens = list(range(9))
    hs = hashes(tokens)
    for rid in ("a", "b"):  # both computed it at once (no sharing)
        assert kv.allocate(rid, 9, kv.match(rid, hs, 9)) is not None
    assert kv.commit("a", hs, 9) == [0, 1]
    assert kv.commit("b", hs, 9) == []
    kv.free("a")
    kv.free("b")
    kv.check_integrity()
    assert len(kv.index) == 2


def test_reset_and_disabled_caching():
    kv = KVCacheManager(num_blocks=4, block_size=4, clock=Clock())
    run(kv, "a", list(range(9)))
    kv.free("a")
    assert kv.reset_prefix_cache() == 2
    kv.check_integrity()
    assert run(kv, "b", list(range(9)))[0] == 0
    off = KVCacheManager(num_blocks=4, block_size=4, index="none", clock=Clock())
    run(off, "a", list(range(9)))
    off.free("a")
    assert run(off, "b", list(range(9)))[0] == 0
    assert len(off.index) == 0


def test_retention_takes_seconds_and_bounds_them():
    assert Retention(300.0, ((16, 3600.0),)).ttl_for_block(0, 16) == 3600.0
    for bad in (float("nan"), float("inf"), -1.0, 31 * 86400.0):
        with pytest.raises(ValueError):
            Retention(bad)
        with pytest.raises(ValueError):
            Retention(0.0, ((16, bad),))


def test_null_index_never_finds_keeps_or_promises():
    from promptcache.cache.index import PREFIX_INDEXES

    assert set(PREFIX_INDEXES) == {"hash", "none"}
    off = KVCacheManager(num_blocks=16, block_size=4, index="none", clock=Clock())
    hs = hash_blocks(ROOT, list(range(24)), 4)
    hit = off.match("a", hs, 24)
    assert off.allocate("a", 8, hit, inflight_hashes=hs[:5]) is not None
    # with caching off nobody waits for a's blocks: they will never be indexed
    assert off.match("b", hs, 24).num_inflight_blocks == 0
    assert off.commit("a", hs, 8) == [] and len(off.index) == 0
    off.check_integrity()
    with pytest.raises(ValueError, match="unknown prefix index"):
        KVCacheManager(num_blocks=4, block_size=4, index="radix")


def test_retained_heap_stays_bounded_under_repeated_hits():
    """Each hit on a retained block used to leave a stale heap entry until its ttl ran out."""
    clock = Clock()
    kv = KVCacheManager(num_blocks=64, block_size=4, clock=clock)
    prompt = list(range(200))  # 50 blocks, 49 hit-able
    day = Retention(default_ttl_s=86400.0)
    for i in range(2000):
        run(kv, f"r{i}", prompt, day)
        kv.free(f"r{i}")
        clock.now += 1.0
    pool = kv.pool
    assert pool.num_retained == 50
    assert len(pool.retained) <= 2 * pool.num_retained + 64  # was 98,001 entries before the fix
    kv.check_integrity()
    assert run(kv, "last", prompt, day)[0] == 49 * 4  # still every block but the last one hit


def test_reuse_stop_says_why_reuse_ended():
    """Each miss names its cause: never cached, evicted (with idle time and age), expired, reset,
    being computed by another request, or nothing left to reuse."""
    from promptcache.cache import EVICTED, EXPIRED, IN_FLIGHT, NOT_CACHED, RESET, REUSED_ALL

    clock = Clock()
    kv = KVCacheManager(num_blocks=6, block_size=4, clock=clock)
    a = list(range(13))  # 3 full blocks, the last token always runs
    first = kv.match("a", hashes(a), len(a))
    assert first.stop.reason == NOT_CACHED and first.stop.token == 0
    run(kv, "a", a)
    kv.free("a")
    again = kv.match("a2", hashes(a), len(a))
    assert again.stop.reason == REUSED_ALL and again.stop.token == 12
    diverged = kv.match("d", hashes(a[:8] + [99] * 5), 13)
    assert diverged.stop.reason == NOT_CACHED and diverged.stop.token == 8
    clock.now += 30
    run(kv, "b", [50 + i for i in range(24)])  # needs all 6 blocks: a's 3 are evicted
    clock.now += 12
    gone = kv.match("a3", hashes(a), len(a))
    assert gone.stop.reason == EVICTED and gone.stop.token == 0
    assert gone.stop.idle_s == 30 and gone.stop.ago_s == 12
    kv.free("b")
    run(kv, "a", a, Retention(60.0))  # cached again: the old drop explains nothing now
    kv.free("a")
    assert kv.match("a4", hashes(a), len(a)).stop.reason == REUSED_ALL
    clock.now += 61  # its retention ends, then room is needed
    run(kv, "c", [80 + i for i in range(24)])
    assert kv.match("a5", hashes(a), len(a)).stop.reason == EXPIRED
    kv.free("c")
    run(kv, "e", a)
    kv.free("e")
    kv.reset_prefix_cache()
    assert kv.match("a6", hashes(a), len(a)).stop.reason == RESET
    # another request is computing the blocks right now
    hs = hashes(a)
    kv.allocate("writer", len(a), kv.match("writer", hs, len(a)), inflight_hashes=hs[:3])
    assert kv.match("reader", hs, len(a)).stop.reason == IN_FLIGHT
    kv.free("writer")
    from promptcache.cache import BELOW_ONE_BLOCK

    assert kv.match("tiny", hashes(a[:4]), 4).stop.reason == BELOW_ONE_BLOCK  # its one block holds the last token
    kv.check_integrity()


def test_eviction_log_is_bounded():
    from promptcache.cache import EvictionLog

    log = EvictionLog(capacity=3)
    for i in range(10):
        log.record(bytes([i]), "evicted", float(i), 0.0)
    assert len(log) == 3 and log.lookup(bytes([0])) is None and log.lookup(bytes([9])) is not None
    assert EvictionLog(capacity=0).lookup(b"x") is None
