"""The prompt cache end to end on random:tiny: exact reuse counts, identical greedy outputs."""

from __future__ import annotations

import pytest
import torch

from promptcache import LLM, SamplingParams
from promptcache.engine.request import RequestSpec

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 4000, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def llm():
    return LLM("random:tiny", dtype="float32", num_blocks=512)


@pytest.fixture(scope="module")
def llm_off():
    return LLM("random:tiny", dtype="float32", num_blocks=512, enable_prefix_caching=False)


def test_extended_prompt_reuses_block_aligned_prefix(llm, llm_off):
    llm.reset_prefix_cache()
    a = ids(600, 1)
    first = llm.generate([a], GREEDY)[0]
    assert first.usage.cached_tokens == 0 and first.usage.prompt_tokens == 600
    longer = a + ids(40, 2)
    second = llm.generate([longer], GREEDY)[0]
    assert second.usage.cached_tokens == 592
    assert second.usage.cache_write_tokens == 640 - 592
    assert second.token_ids == llm_off.generate([longer], GREEDY)[0].token_ids
    assert llm_off.generate([longer], GREEDY)[0].usage.cached_tokens == 0
    llm.engine.check_integrity()


def test_second_turn_reuses_prompt_and_reply(llm):
    llm.reset_prefix_cache()
    turn1 = ids(300, 3)
    reply = llm.generate([turn1], SamplingParams(max_tokens=21, temperature=0.0, ignore_eos=True))[0]
    turn2 = turn1 + reply.token_ids + ids(30, 4)
    out = llm.generate([turn2], GREEDY)[0]
    # the reply's last token was sampled, never run, so its K/V does not exist: everything before it
    # that fills whole blocks is reused
    computed_in_turn1 = len(turn1) + len(reply.token_ids) - 1
    assert out.usage.cached_tokens == computed_in_turn1 // 16 * 16 == 320
    assert out.usage.cached_tokens > len(turn1)


def test_tenants_never_share(llm):
    llm.reset_prefix_cache()
    prompt = ids(200, 5)
    assert llm.generate([prompt], GREEDY, tenant="a")[0].usage.cached_tokens == 0
    assert llm.generate([prompt], GREEDY, tenant="b")[0].usage.cached_tokens == 0
    assert llm.generate([prompt], GREEDY, tenant="a")[0].usage.cached_tokens == 192


def test_eight_simultaneous_requests_compute_shared_prefix_once(llm, llm_off):
    llm.reset_prefix_cache()
    prefix = ids(1024, 6)
    prompts = [prefix + ids(32, 100 + i) for i in range(8)]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    before = llm.stats()["computed_tokens"]
    outs = llm.generate(prompts, params)
    computed = llm.stats()["computed_tokens"] - before
    # the prefix once, every suffix once, 3 decode steps each (the 4th token is never run)
    assert computed == 1024 + 8 * 32 + 8 * 3
    assert [o.usage.cached_tokens for o in outs] == [0] + [1024] * 7
    assert [o.token_ids for o in outs] == [o.token_ids for o in llm_off.generate(prompts, params)]
    llm.engine.check_integrity()


def test_working_set_ten_times_the_pool():
    small = LLM("random:tiny", dtype="float32", num_blocks=24)  # 384 tokens of KV
    off = LLM("random:tiny", dtype="float32", num_blocks=24, enable_prefix_caching=False)
    prompts = [ids(220, 200 + i) for i in range(6)] * 3  # 18 requests, ~4000 distinct tokens
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = small.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in off.generate(prompts, params)]
    stats = small.stats()
    assert stats["blocks_evicted"] > 0
    assert stats["blocks_in_use"] == 0
    small.engine.check_integrity()


def test_too_large_request_is_a_clear_error():
    small = LLM("random:tiny", dtype="float32", num_blocks=4)
    with pytest.raises(ValueError, match="needs 5 KV blocks"):
        small.generate([ids(70, 1)], SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="context is"):
        LLM("random:tiny", dtype="float32", num_blocks=8, max_model_len=64).generate([ids(70, 1)])


def test_retention_and_usage_by_ttl(llm):
    from promptcache.cache import Retention

    llm.reset_prefix_cache()
    prompt = ids(100, 9)
    out = llm.generate([prompt], GREEDY, retention=Retention(breakpoints=((64, 3600.0), (96, 300.0))))[0]
    by_ttl = out.usage.cache_write_tokens_by_ttl
    assert by_ttl[3600.0] == 64 and by_ttl[300.0] == 32
    assert llm.engine.kv.pool.num_retained == 6


def test_prewarm_with_zero_max_tokens(llm):
    llm.reset_prefix_cache()
    prompt = ids(100, 11)
    warm = llm.generate([prompt], SamplingParams(max_tokens=0))[0]
    assert warm.token_ids == [] and warm.finish_reason == "length"
    assert warm.usage.cache_write_tokens == 96
    assert llm.generate([prompt], GREEDY)[0].usage.cached_tokens == 96


def test_cache_writes_count_whole_prompt_blocks_once(llm):
    llm.reset_prefix_cache()
    prompt = ids(104, 12)  # 6 full blocks + 8 tokens
    short = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))[0]
    assert short.usage.cache_write_tokens == 96
    llm.reset_prefix_cache()
    long = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))[0]
    assert long.usage.cache_write_tokens == 96  # the tail block filled by generated tokens is not a write


def test_abort_all_frees_everything(llm):
    engine = llm.engine
    for i in range(3):
        engine.add_request(RequestSpec(f"ab{i}", ids(50, 30 + i), SamplingParams(max_tokens=20, ignore_eos=True)))
    engine.step()
    engine.abort_all()
    assert not engine.has_unfinished_requests()
    assert engine.stats()["blocks_in_use"] == 0
    engine.check_integrity()


def test_cached_equals_uncached_with_16_bit_kv_cache():
    # bf16 K/V (with float32 matmuls where the CPU lacks bf16): fresh and cached context must be
    # attended in the same rounding, or cache hits would shift the model's probabilities
    on = LLM("random:tiny", dtype="float32", kv_cache_dtype="bfloat16", num_blocks=128)
    off = LLM("random:tiny", dtype="float32", kv_cache_dtype="bfloat16", num_blocks=128, enable_prefix_caching=False)
    base = ids(300, 40)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=5)
    on.generate([base], params)
    for extra in range(3):
        prompt = base + ids(20 + extra, 50 + extra)
        hit = on.generate([prompt], params)[0]
        ref = off.generate([prompt], params)[0]
        assert hit.usage.cached_tokens == 288
        assert hit.token_ids == ref.token_ids
        # same values attended: only summation order differs (bf16 rounding differences are ~1e-3)
        for a, b in zip(hit.logprobs[0].top, ref.logprobs[0].top, strict=True):
            assert a[0] == b[0] and abs(a[1] - b[1]) < 2e-5


def test_cache_hit_does_not_queue_behind_a_long_cold_prefill():
    engine = LLM("random:tiny", dtype="float32", num_blocks=256, max_num_batched_tokens=256).engine
    warm = ids(600, 60)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    engine.add_request(RequestSpec("warm", warm, params))
    while engine.has_unfinished_requests():
        engine.step()
    engine.add_request(RequestSpec("long", ids(1000, 61), params))  # arrives first, needs 4 steps of prefill
    engine.add_request(RequestSpec("hit", warm + ids(10, 62), params))  # 592 cached, 18 to compute
    first_step = {o.request_id: o for o in engine.step()}
    assert "hit" in first_step and first_step["hit"].usage.cached_tokens == 592
    running = {r.request_id: r for r in engine.scheduler.running}
    assert running["long"].num_computed_tokens == 256 - 18  # the long prefill progressed too
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_integrity()


def test_shared_prefix_decode_matches_cache_off_logprobs(llm, llm_off):
    # decode tokens sharing a cached prefix attend to it in one stacked call (cascade attention);
    # the merged result must be the same attention, not an approximation
    llm.reset_prefix_cache()
    prefix = ids(500, 70)
    prompts = [prefix + ids(20 + i, 71 + i) for i in range(6)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=5)
    on, off = llm.generate(prompts, params), llm_off.generate(prompts, params)
    assert [o.usage.cached_tokens for o in on] == [0] + [496] * 5
    for a, b in zip(on, off, strict=True):
        assert a.token_ids == b.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_requests_join_the_step_that_computes_their_prefix(llm_off, deterministic):
    """Eight requests over one new 600-token prefix, a 256-token budget: the first computes the
    prefix in chunks while the others wait, and they run in the step that finishes it, reading its
    fresh K/V — same outputs as without the cache, the prefix computed once."""
    engine = LLM("random:tiny", dtype="float32", num_blocks=256, max_num_batched_tokens=256,
                 deterministic=deterministic).engine
    prefix = ids(600, 80)
    prompts = [prefix + ids(8, 81 + i) for i in range(8)]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=2)
    for i, p in enumerate(prompts):
        engine.add_request(RequestSpec(f"r{i}", p, params))
    first: dict[str, int] = {}
    outs = {}
    step = 0
    while engine.has_unfinished_requests():
        step += 1
        for o in engine.step():
            first.setdefault(o.request_id, step)
            outs[o.request_id] = o
    # r0's 608 tokens take steps 1-3 (256 + 256 + 96); the others' 592 cached tokens include the
    # blocks r0 computes in step 3, and their 16-token suffixes fit beside it
    assert first == {f"r{i}": 3 for i in range(8)}
    assert [outs[f"r{i}"].usage.cached_tokens for i in range(8)] == [0] + [592] * 7
    assert engine.stats()["computed_tokens"] == 608 + 7 * 16 + 8 * 2
    off = llm_off.generate(prompts, params)
    for i, o in enumerate(off):
        assert outs[f"r{i}"].token_ids == o.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(outs[f"r{i}"].logprobs, o.logprobs, strict=True)) < 1e-4
    engine.check_integrity()
