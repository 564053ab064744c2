"""The scheduler without a model: exact chunk assignments per step, preemption victims, and a
``check_integrity`` that really fails on corrupted state (torch-free: cache + engine bookkeeping)."""

from __future__ import annotations

import pytest

from promptcache.cache import NO_RETENTION, IntegrityError, KVCacheManager, namespace_hash
from promptcache.engine.config import EngineConfig
from promptcache.engine.request import Request, Status
from promptcache.engine.sampling import SamplingParams
from promptcache.engine.scheduler import Scheduler
from promptcache.engine.usage import UsageLedger

BLOCK = 4
ROOT = namespace_hash("model", None)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(num_blocks: int, budget: int) -> tuple[Scheduler, KVCacheManager]:
    clock = Clock()
    kv = KVCacheManager(num_blocks, BLOCK, "hash", clock)
    config = EngineConfig.of(block_size=BLOCK, max_num_batched_tokens=budget, num_blocks=num_blocks)
    return Scheduler(config, kv, clock, UsageLedger(BLOCK)), kv


def request(sched: Scheduler, rid: str, prompt: list[int], max_tokens: int = 8) -> Request:
    req = Request(rid, prompt, SamplingParams(max_tokens=max_tokens), ROOT, BLOCK, NO_RETENTION)
    sched.add(req)
    return req


def step(sched: Scheduler, kv: KVCacheManager) -> list[tuple[str, int]]:
    """One step as the engine runs it, minus the model: every chunk computes; ends sample token 7."""
    chunks = sched.schedule()
    for c in chunks:
        req = c.request
        reaches_end = c.reaches_end
        req.num_computed_tokens += c.num_tokens
        kv.commit(req.request_id, req.block_hashes, req.num_computed_tokens)
        if reaches_end:
            req.append_token(7)
    kv.check_integrity()
    return [(c.request.request_id, c.num_tokens) for c in chunks]


def test_decodes_first_then_short_hits_then_prefills_then_the_queue():
    sched, kv = make(num_blocks=64, budget=32)
    a_prompt = list(range(100, 120))  # 20 tokens, 5 full blocks
    request(sched, "a", a_prompt)
    assert step(sched, kv) == [("a", 20)]
    request(sched, "b", list(range(200, 240)))  # 40 cold tokens: longer than half the budget
    request(sched, "c", a_prompt[:16] + [1, 2, 3, 4])  # 16 cached + 4 new: a short hit
    # a decodes; c (4 uncached tokens) jumps ahead of b; b takes what is left of the budget
    assert step(sched, kv) == [("a", 1), ("c", 4), ("b", 27)]
    assert list(sched.waiting) == []
    assert [r.usage.cached_tokens for r in sched.running] == [0, 16, 0]
    # decodes (a, c) before b's running prefill continues with its last 13 tokens
    assert step(sched, kv) == [("a", 1), ("c", 1), ("b", 13)]
    assert step(sched, kv) == [("a", 1), ("c", 1), ("b", 1)]


def test_short_hits_use_at_most_half_the_budget_and_keep_order():
    sched, kv = make(num_blocks=64, budget=16)
    shared = list(range(300, 324))  # 24 tokens
    request(sched, "warm", shared)
    step(sched, kv), step(sched, kv)  # 16 + 8: prefilled in two chunks
    request(sched, "cold", list(range(500, 540)))  # 40 uncached tokens, first in the queue
    for i in range(3):  # each 24 cached + 4 new: 4 uncached tokens
        request(sched, f"hit{i}", shared + [10 + i] * 4)
    # warm decodes (1 of 16); short hits may use half of the 15 left (7): hit0 fits, hit1 would not;
    # then the queue in arrival order: cold takes the remaining 11, hit1 and hit2 wait their turn
    assert step(sched, kv) == [("warm", 1), ("hit0", 4), ("cold", 11)]
    assert [r.request_id for r in sched.waiting] == ["hit1", "hit2"]


def test_preemption_takes_the_newest_running_request_and_keeps_its_blocks_cached():
    sched, kv = make(num_blocks=6, budget=64)
    a = request(sched, "a", list(range(10, 18)), max_tokens=16)  # 2 blocks each
    b = request(sched, "b", list(range(20, 28)), max_tokens=16)
    assert step(sched, kv) == [("a", 8), ("b", 8)]
    for _ in range(4):  # tokens 9..12 of each fit in a third block: 6 blocks in use
        step(sched, kv)
    assert kv.stats()["blocks_in_use"] == 6 and a.num_computed_tokens == b.num_computed_tokens == 12
    # position 12 needs a fourth block each: a grows by preempting b, the newest
    assert step(sched, kv) == [("a", 1)]
    assert b.status is Status.WAITING and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert sched.num_preemptions == 1 and list(sched.waiting) == [b]
    # b's three full blocks were released to the cache; a's new block evicted b's deepest one
    assert kv.stats()["blocks_cached"] == 2 and kv.stats()["blocks_evicted"] == 1


@pytest.mark.parametrize("corrupt", ["two-places", "ref-count", "hash-map", "lost-block"])
def test_check_integrity_fails_on_corrupted_state(corrupt):
    sched, kv = make(num_blocks=8, budget=32)
    request(sched, "a", list(range(10, 22)))
    request(sched, "b", list(range(30, 38)), max_tokens=1)
    step(sched, kv)
    step(sched, kv)  # b finishes after one token... the scheduler frees it when the engine finishes it
    sched.finish(sched.running[-1], "length")
    kv.check_integrity()
    pool = kv.pool
    in_use = next(b for b in pool.blocks if b.ref_cnt)
    cached = next(iter(pool.lru))
    if corrupt == "two-places":
        pool.empty.append(cached)  # a cached block also on the empty stack
    elif corrupt == "ref-count":
        in_use.ref_cnt += 1
    elif corrupt == "hash-map":
        h = next(h for h, blk in kv.index.entries() if blk is not in_use)
        kv.index._blocks[h] = in_use  # type: ignore[attr-defined]  # points at a block with other content
    else:
        pool.empty.pop()  # a block no list holds
    with pytest.raises(IntegrityError):
        kv.check_integrity()


def test_a_waiting_request_joins_the_step_that_finishes_its_prefix():
    """b wants blocks a is computing: it waits while a's chunks do not reach them, then runs in the
    step whose chunk finishes them (reading a's fresh K/V), not the step after."""
    sched, kv = make(num_blocks=64, budget=16)
    shared = list(range(100, 140))  # 40 tokens, 10 blocks
    a = request(sched, "a", shared + [1, 2, 3, 4])  # 44 tokens: chunks of 16, 16, 12
    assert step(sched, kv) == [("a", 16)]
    b = request(sched, "b", shared + [5, 6, 7, 8])
    assert kv.match("b", b.block_hashes, b.num_tokens).num_inflight_blocks == 6  # blocks 4-9, a's
    assert step(sched, kv) == [("a", 16)]  # a reaches token 32: blocks 8 and 9 are not done yet
    assert [r.request_id for r in sched.waiting] == ["b"]
    assert step(sched, kv) == [("a", 12), ("b", 4)]  # a finishes blocks 8-9 in this step: b joins it
    assert b.usage.cached_tokens == 40 and b.num_computed_tokens == 44
    assert kv.block_ids("b")[:10] == kv.block_ids("a")[:10]  # one copy of the prefix
    assert step(sched, kv) == [("a", 1), ("b", 1)]
    sched.finish(a, "length")
    kv.check_integrity()  # b still holds a's blocks, now indexed; a's own last block went back
    sched.finish(b, "length")
    kv.check_integrity()
    assert kv.stats()["blocks_in_use"] == 0


def test_a_request_whose_prefix_owner_is_not_in_the_step_keeps_waiting():
    sched, kv = make(num_blocks=64, budget=16)
    shared = list(range(100, 140))
    request(sched, "a", shared + [1, 2, 3, 4])
    step(sched, kv)
    request(sched, "b", shared + [5, 6, 7, 8])
    hit = kv.match("b", sched.waiting[0].block_hashes, 44)
    assert kv.join_inflight(sched.waiting[0].block_hashes, 44, hit, {}) is None
    assert kv.join_inflight(sched.waiting[0].block_hashes, 44, hit, {"a": 36}) is None  # block 9 not done
    assert kv.join_inflight(sched.waiting[0].block_hashes, 44, hit, {"a": 40}) is None  # a holds 4 blocks
    kv.allocate("a", 40)  # a's next chunk is scheduled: its table covers blocks 4-9
    joined = kv.join_inflight(sched.waiting[0].block_hashes, 44, hit, {"a": 40, "b": 0})
    assert joined is not None and joined.num_tokens == 40 and joined.num_inflight_blocks == 0
    assert [blk.block_id for blk in joined.blocks] == kv.block_ids("a")[:10]
