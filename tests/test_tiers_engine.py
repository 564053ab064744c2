"""The disk tier under a real engine (random:tiny): restarts, corruption, isolation, sharing.

Counts are exact (cached tokens, blocks loaded, objects stored); outputs are compared with a
cache-off engine's greedy tokens.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from promptcache import LLM, SamplingParams
from promptcache.cache import Retention
from promptcache.cache.hashing import hash_blocks
from promptcache.engine.request import RequestSpec

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
BS = 16


def ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 4000, (n,), generator=g).tolist()


def tiered(directory: Path, **kw: Any) -> LLM:
    settings: dict[str, Any] = dict(dtype="float32", num_blocks=512, max_model_len=4096, disk_cache=str(directory),
                                    tier_skip_slower=False)
    settings.update(kw)
    return LLM("random:tiny", **settings)


@pytest.fixture(scope="module")
def llm_off() -> LLM:
    return LLM("random:tiny", dtype="float32", num_blocks=512, max_model_len=4096, enable_prefix_caching=False)


def written(llm: LLM) -> dict[str, Any]:
    assert llm.engine.tiers is not None and llm.engine.tiers.flush()
    return llm.engine.tier_stats()["disk"]


def objects(directory: Path) -> set[str]:
    return {p.stem for p in (directory / "objects").rglob("*.kv")}


def test_a_restart_serves_the_prefix_from_disk(tmp_path: Path, llm_off: LLM) -> None:
    prompt = ids(2000, 1)
    first = tiered(tmp_path)
    out = first.generate(prompt, GREEDY)[0]
    assert out.usage.cached_tokens == 0
    assert written(first)["writes"] == 2000 // BS  # every full prompt block
    first.engine.close()

    second = tiered(tmp_path)  # a new process would see the same: the index is rebuilt from the files
    follow_up = prompt + ids(40, 2)
    out = second.generate(follow_up, GREEDY)[0]
    assert out.usage.cached_tokens == 2000 // BS * BS
    assert out.usage.cached_tokens_by_tier == {"disk": 2000 // BS * BS}
    assert out.token_ids == llm_off.generate(follow_up, GREEDY)[0].token_ids
    stats = second.engine.tier_stats()["disk"]
    assert stats["hit_blocks"] == 2000 // BS and stats["corrupt"] == 0
    second.engine.check_integrity()
    # now in memory: the next resend is a memory hit, nothing more is read from disk
    again = second.generate(prompt + ids(40, 3), GREEDY)[0]
    assert again.usage.cached_tokens == 2000 // BS * BS and again.usage.cached_tokens_by_tier == {}
    assert second.engine.tier_stats()["disk"]["hit_blocks"] == 2000 // BS
    second.engine.close()


def test_flipped_and_truncated_objects_are_misses_never_served(tmp_path: Path, llm_off: LLM) -> None:
    prompt = ids(640, 4)  # 40 blocks
    first = tiered(tmp_path)
    first.generate(prompt, GREEDY)
    written(first)
    first.engine.close()
    root = first.engine.namespace.root(None)
    chain = hash_blocks(root, prompt, BS)
    flip = tmp_path / "objects" / chain[20].hex()[:2] / f"{chain[20].hex()}.kv"
    data = bytearray(flip.read_bytes())
    data[len(data) // 2] ^= 0x40
    flip.write_bytes(bytes(data))
    cut = tmp_path / "objects" / chain[30].hex()[:2] / f"{chain[30].hex()}.kv"
    cut.write_bytes(cut.read_bytes()[:-100])

    second = tiered(tmp_path)
    assert second.engine.tier_stats()["disk"]["discarded"] == 1  # the truncated one, at start-up
    out = second.generate(prompt, GREEDY)[0]
    assert out.usage.cached_tokens == 20 * BS  # the run ends at the flipped block
    assert out.token_ids == llm_off.generate(prompt, GREEDY)[0].token_ids
    stats = second.engine.tier_stats()["disk"]
    assert stats["corrupt"] == 1 and stats["hit_blocks"] == 20
    assert not flip.exists() or flip.read_bytes() != bytes(data)  # deleted (then rewritten whole)
    second.engine.check_integrity()
    second.engine.close()


def test_no_object_is_shared_across_tenants_models_dtypes_or_block_sizes(tmp_path: Path,
                                                                        hf_checkpoints: dict[str, Path]) -> None:
    prompt = ids(200, 5)
    seen: set[str] = set()
    variants: list[tuple[dict[str, Any], str | None]] = [
        ({}, "acme"),
        ({}, "globex"),  # another tenant
        ({"kv_cache_dtype": "bfloat16"}, "acme"),  # another KV dtype
        ({"block_size": 32}, "acme"),  # another block size
        ({"model": str(hf_checkpoints["llama"])}, "acme"),  # another model
    ]
    for settings, tenant in variants:
        model = settings.pop("model", "random:tiny")
        llm = LLM(model, **{**dict(dtype="float32", num_blocks=256, max_model_len=1024, disk_cache=str(tmp_path),
                                   tier_skip_slower=False), **settings})
        out = llm.generate(prompt, GREEDY, tenant=tenant)[0]
        assert out.usage.cached_tokens == 0, (settings, tenant)  # nothing another variant stored is found
        written(llm)
        mine = objects(tmp_path) - seen
        assert len(mine) == 200 // llm.engine.block_size, (settings, tenant)
        seen |= mine
        llm.engine.close()


def test_waiting_requests_share_one_load(tmp_path: Path) -> None:
    prompt = ids(480, 6)  # 30 blocks
    first = tiered(tmp_path)
    first.generate(prompt, GREEDY)
    written(first)
    first.engine.close()
    second = tiered(tmp_path)
    outs = second.generate([prompt + ids(20, 7), prompt + ids(20, 8), prompt + ids(20, 9)], GREEDY)
    assert [o.usage.cached_tokens for o in outs] == [480] * 3
    assert second.engine.tier_stats()["disk"]["hit_blocks"] == 30  # loaded once, shared
    assert sum(o.usage.cached_tokens_by_tier.get("disk", 0) for o in outs) >= 480
    second.engine.check_integrity()
    second.engine.close()


def test_an_aborted_request_releases_its_load(tmp_path: Path) -> None:
    prompt = ids(480, 10)
    first = tiered(tmp_path)
    first.generate(prompt, GREEDY)
    written(first)
    first.engine.close()
    second = tiered(tmp_path)
    engine = second.engine
    free_before = engine.kv.num_free_blocks
    engine.add_request(RequestSpec("r", prompt + [5], GREEDY))
    engine.step()  # starts the load
    assert engine.abort_request("r")
    for _ in range(200):  # the loader returns; its blocks go back to the pool
        engine.step()
        if not engine.tiers.loading() and not engine.kv.tables:
            break
    assert not engine.kv.tables and engine.kv.num_free_blocks == free_before
    engine.check_integrity()
    engine.close()


def test_retained_admission_writes_only_retained_blocks(tmp_path: Path) -> None:
    llm = tiered(tmp_path, tier_admission="retained")
    prompt = ids(320, 11)  # 20 blocks; a breakpoint covers the first 8
    llm.generate(prompt, GREEDY, retention=Retention(0.0, ((8 * BS, 3600.0),)))
    assert written(llm)["writes"] == 8
    llm.engine.close()


def test_a_load_into_a_pool_just_big_enough(tmp_path: Path, llm_off: LLM) -> None:
    """The loaded run takes the blocks the request then reuses: it fits, and the output is right."""
    prompt = ids(400, 12)
    first = tiered(tmp_path)
    first.generate(prompt, GREEDY)
    written(first)
    first.engine.close()
    small = tiered(tmp_path, num_blocks=27)  # the request needs 26 blocks; loading needs them too
    out = small.generate(prompt + [7], GREEDY)[0]
    assert out.token_ids == llm_off.generate(prompt + [7], GREEDY)[0].token_ids
    small.engine.check_integrity()
    small.engine.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_block_bytes_round_trip_between_any_blocks(device: str, kv_dtype: str) -> None:
    """read_blocks -> write_blocks moves every slot's K and V of every layer, whatever the ids."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    llm = LLM("random:tiny", dtype="float32", kv_cache_dtype=kv_dtype, num_blocks=64, device=device)
    runner = llm.engine.runner
    for kv in runner.kv_caches:
        kv.copy_(torch.randn(kv.shape, dtype=torch.float32).to(kv.dtype))
    src, dst = [5, 3, 9, 10, 11], [40, 41, 20, 7, 8]  # runs and strays, in both lists
    payloads = runner.read_blocks(src)
    assert [p.nbytes for p in payloads] == [runner.block_bytes] * 5
    runner.write_blocks(dst, payloads)
    bs = runner.block_size
    for kv in runner.kv_caches:
        for s, d in zip(src, dst, strict=True):
            assert torch.equal(kv[:, :, d * bs : (d + 1) * bs], kv[:, :, s * bs : (s + 1) * bs])


def _stored(tmp_path: Path, prompts: list[list[int]]) -> None:
    first = tiered(tmp_path)
    for p in prompts:
        first.generate(p, GREEDY)
    written(first)
    first.engine.close()


def _slow_loads(engine: Any, seconds: float) -> None:
    """A slow disk: every read of the disk tier takes ``seconds`` (wraps the real read)."""
    disk = engine.tiers.stack.tiers[0]
    real = disk.get_many

    def slow(hashes: Any) -> Any:
        time.sleep(seconds)
        return real(hashes)

    disk.get_many = slow


def test_a_reused_request_id_never_mixes_two_loads(tmp_path: Path, llm_off: LLM) -> None:
    """X is aborted while its load is in flight and re-added, same id, another prompt."""
    s, a, b = ids(160, 20), ids(160, 21), ids(160, 22)
    _stored(tmp_path, [s + a + [7], s + b + [7]])
    llm = tiered(tmp_path, num_blocks=256)
    engine = llm.engine
    llm.generate(s + [9], GREEDY)  # the shared start is in memory now
    _slow_loads(engine, 0.5)
    engine.add_request(RequestSpec("X", s + a + [7], GREEDY))
    engine.step()  # its load starts (and sleeps)
    engine.abort_request("X")
    engine.add_request(RequestSpec("X", s + b + [7], GREEDY))
    want = llm_off.generate(s + b + [7], GREEDY)[0].token_ids
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o if o.finished else out
    assert out is not None and out.token_ids == want
    engine.check_integrity()
    assert not engine.kv.tables
    assert llm.generate(s + b + [7], GREEDY)[0].token_ids == want  # what it left cached is right too
    engine.close()


def test_loads_for_waiting_requests_never_pin_memory_the_head_needs(tmp_path: Path, llm_off: LLM) -> None:
    """A 100-block pool: one long decode running, a cold 65-block request at the head of the queue,
    and behind it a request whose 39-block prefix is on disk. The load must not take blocks the head
    can never get back (it did: the queue stalled for good)."""
    prefix = ids(39 * BS, 1)
    first = tiered(tmp_path, num_blocks=100, max_num_batched_tokens=256)
    first.generate(prefix + [5], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    written(first)
    first.engine.close()
    llm = tiered(tmp_path, num_blocks=100, max_num_batched_tokens=256)
    engine = llm.engine
    long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    engine.add_request(RequestSpec("R0", ids(40 * BS, 9), long))
    for _ in range(5):
        engine.step()
    short = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine.add_request(RequestSpec("R1", ids(64 * BS, 2), short))
    engine.add_request(RequestSpec("R2", prefix + ids(300, 3), short))
    done: dict[str, list[int]] = {}
    for _ in range(3000):
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.token_ids
        if not engine.has_unfinished_requests():
            break
    assert set(done) == {"R0", "R1", "R2"}, f"stalled: waiting {[r.request_id for r in engine.scheduler.waiting]}"
    assert done["R2"] == llm_off.generate(prefix + ids(300, 3), short)[0].token_ids
    engine.check_integrity()
    engine.close()


def test_a_step_that_fails_half_way_stores_nothing_stale(tmp_path: Path, llm_off: LLM) -> None:
    """Fault injection: the step fails after its blocks were indexed (as a detokeniser bug would);
    the abort frees them, the next request reuses their ids; what is on disk must still be right."""
    llm = tiered(tmp_path)
    engine = llm.engine
    a, b = ids(320, 26), ids(320, 27)
    real = engine.usage.generated
    calls = {"n": 0}

    def failing(req: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")
        real(req)

    engine.usage.generated = failing  # type: ignore[method-assign]
    engine.add_request(RequestSpec("a", a, GREEDY))
    with pytest.raises(RuntimeError, match="injected"):
        while engine.has_unfinished_requests():
            engine.step()
    engine.abort_all()  # what AsyncEngine's recovery does
    engine.check_integrity()
    engine.reset_prefix_cache()
    llm.generate(b, GREEDY)  # takes the freed blocks
    written(llm)
    engine.close()
    restored = tiered(tmp_path)
    for p in (a, b):
        out = restored.generate(p + [3], GREEDY)[0]
        assert out.token_ids == llm_off.generate(p + [3], GREEDY)[0].token_ids
    restored.engine.close()


@pytest.mark.gpu
def test_a_restart_on_a_gpu(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    prompt = ids(640, 28)
    first = tiered(tmp_path, device="cuda")
    expected = first.generate(prompt + [4], GREEDY)[0].token_ids
    written(first)
    first.engine.close()
    second = tiered(tmp_path, device="cuda")
    out = second.generate(prompt + [4], GREEDY)[0]
    assert out.usage.cached_tokens_by_tier == {"disk": 640} and out.token_ids == expected
    second.engine.close()
