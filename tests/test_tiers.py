"""The tiers below memory without a model: object format, disk tier, breaker, skip rule, stack."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import threading
from pathlib import Path

import pytest

from promptcache.cache.disk_tier import DiskTier
from promptcache.cache.hashing import BlockHash, hash_block, namespace_hash
from promptcache.cache.redis_tier import CircuitBreaker
from promptcache.cache.tier_format import (
    HEADER_SIZE,
    CorruptObject,
    decode_header,
    digest,
    encode_header,
    layout_digest,
    verify,
)
from promptcache.cache.tiers import TierStack, contains, get, should_load

NS = digest("model-a|bfloat16")
LAYOUT = layout_digest("bfloat16", 2, 2, 16, 16, "kv-head-major-v1")
BLOCK = 1024


def chain(n: int, tenant: str = "t") -> list[BlockHash]:
    out, prev = [], namespace_hash("m", tenant)
    for i in range(n):
        prev = hash_block(prev, list(range(i * 16, (i + 1) * 16)))
        out.append(prev)
    return out


def payload(i: int) -> memoryview:
    return memoryview(bytes([(i * 31 + j) % 251 for j in range(BLOCK)]))


def obj(h: BlockHash, i: int, ttl: float = 0.0) -> tuple[bytes, memoryview]:
    p = payload(i)
    return encode_header(NS, h, LAYOUT, ttl, 1.0e9, p), p


# ---- the object format ---------------------------------------------------------------------------


def test_an_object_round_trips_and_every_defect_is_refused() -> None:
    h = chain(1)[0]
    head, p = obj(h, 0, ttl=300)
    whole = head + bytes(p)
    assert bytes(verify(whole, NS, h, LAYOUT, BLOCK)) == bytes(p)
    header = decode_header(whole)
    assert (header.ttl_s, header.payload_len, header.object_len) == (300, BLOCK, HEADER_SIZE + BLOCK)
    flipped = bytearray(whole)
    flipped[HEADER_SIZE + 100] ^= 1
    cases = {
        "payload checksum": bytes(flipped),
        "torn or truncated": whole[:-10],
        "shorter than its header": whole[:20],
        "bad magic": b"X" + whole[1:],
        "header checksum": whole[:40] + bytes([whole[40] ^ 1]) + whole[41:],
    }
    for why, data in cases.items():
        with pytest.raises(CorruptObject, match=why):
            verify(data, NS, h, LAYOUT, BLOCK)
    with pytest.raises(CorruptObject, match="another block"):
        verify(whole, NS, chain(2)[1], LAYOUT, BLOCK)
    with pytest.raises(CorruptObject, match="another model namespace"):
        verify(whole, digest("model-b"), h, LAYOUT, BLOCK)
    with pytest.raises(CorruptObject, match="another KV layout"):
        verify(whole, NS, h, layout_digest("float32", 2, 2, 16, 16, "kv-head-major-v1"), BLOCK)
    with pytest.raises(CorruptObject, match="a block here is"):
        verify(whole, NS, h, LAYOUT, BLOCK * 2)


def test_layout_digest_frames_each_field() -> None:
    a = layout_digest("bfloat16", 12, 3, 64, 16, "v1")
    assert a != layout_digest("bfloat16", 1, 23, 64, 16, "v1")  # "12","3" vs "1","23"
    assert a != layout_digest("bfloat16", 12, 3, 64, 32, "v1")
    assert a == layout_digest("bfloat16", 12, 3, 64, 16, "v1")


# ---- the disk tier -------------------------------------------------------------------------------


def test_disk_tier_survives_a_restart_and_discards_what_a_crash_left(tmp_path: Path) -> None:
    hs = chain(4)
    disk = DiskTier(tmp_path, 1 << 30)
    for i, h in enumerate(hs):
        disk.put(h, *obj(h, i), ttl_s=0)
    assert disk.chain(hs) == 4 and contains(disk, hs[0])
    gone = subprocess.Popen(["true"])
    gone.wait()  # a writer that has exited: its pid is not running
    (tmp_path / "tmp" / f"interrupted.{gone.pid}.ab.tmp").write_bytes(b"half an object")  # a crash mid-write
    live = tmp_path / "tmp" / f"inprogress.{os.getpid()}.cd.tmp"  # another live server's write: kept
    live.write_bytes(b"being written")
    path = disk._path(hs[2])
    path.write_bytes(path.read_bytes()[:-1])  # truncated behind our back
    reopened = DiskTier(tmp_path, 1 << 30)
    assert reopened.discarded == 2
    assert list((tmp_path / "tmp").iterdir()) == [live] and not path.exists()
    assert reopened.chain(hs) == 2  # the run stops at the deleted object
    data = get(reopened, hs[1])
    assert data is not None and bytes(verify(data, NS, hs[1], LAYOUT, BLOCK)) == bytes(payload(1))
    assert reopened.gauges()["objects"] == 3


def test_disk_capacity_evicts_least_recently_used_and_keeps_retained_longest(tmp_path: Path) -> None:
    now = [1000.0]
    size = HEADER_SIZE + BLOCK
    disk = DiskTier(tmp_path, 3 * size, clock=lambda: now[0])
    hs = chain(5)
    disk.put(hs[0], *obj(hs[0], 0), ttl_s=3600)  # retained an hour
    for i in (1, 2):
        now[0] += 1
        disk.put(hs[i], *obj(hs[i], i), ttl_s=0)
    now[0] += 1
    disk.touch(hs[1], 0.0)  # used again (the stack touches what it loaded): hs[2] is now the least recent
    now[0] += 1
    disk.put(hs[3], *obj(hs[3], 3), ttl_s=0)
    assert set(disk.stored_hashes()) == {hs[0], hs[1], hs[3]} and disk.evicted == 1
    now[0] += 7200  # hs[0]'s retention has ended: it is the oldest
    disk.put(hs[4], *obj(hs[4], 4), ttl_s=0)
    assert set(disk.stored_hashes()) == {hs[1], hs[3], hs[4]}
    assert sum(1 for _ in (tmp_path / "objects").rglob("*.kv")) == 3


def test_disk_recency_survives_a_restart(tmp_path: Path) -> None:
    size = HEADER_SIZE + BLOCK
    hs = chain(3)
    disk = DiskTier(tmp_path, 10 * size)
    for i, h in enumerate(hs):
        disk.put(h, *obj(h, i), ttl_s=0)
        os.utime(disk._path(h), (1000 + i, 1000 + i))
    os.utime(disk._path(hs[0]), (2000, 2000))  # most recently used
    small = DiskTier(tmp_path, 2 * size)  # restart with less room: the least recent goes
    assert set(small.stored_hashes()) == {hs[0], hs[2]}


def _write_same_block(directory: str, rounds: int) -> None:
    disk = DiskTier(directory, 1 << 30)
    h = chain(1)[0]
    for r in range(rounds):
        disk.put(h, *obj(h, r % 3), ttl_s=0)


def test_concurrent_writers_of_one_block_never_leave_a_corrupt_object(tmp_path: Path) -> None:
    """Two processes (two servers on one directory) and a reader: every read is a whole object."""
    h = chain(1)[0]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_same_block, args=(str(tmp_path), 40)) for _ in range(2)]
    for p in procs:
        p.start()
    reader = DiskTier(tmp_path, 1 << 30)
    seen = 0
    while any(p.is_alive() for p in procs):
        data = reader.get_many([h])[0] if reader.chain([h]) else None  # another process's files are found
        if data is not None:
            verify(data, NS, h, LAYOUT, BLOCK)  # raises if torn
            seen += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert seen > 0
    data = get(reader, h)
    assert data is not None
    verify(data, NS, h, LAYOUT, BLOCK)
    assert not list((tmp_path / "tmp").iterdir())


def test_a_bad_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot use .* as the disk cache"):
        DiskTier(blocker / "sub", 1 << 20)


# ---- breaker and skip rule -----------------------------------------------------------------------


def test_the_circuit_opens_after_failures_and_one_probe_closes_it() -> None:
    now = [0.0]
    b = CircuitBreaker(failures=3, cooldown_s=5.0, clock=lambda: now[0])
    for _ in range(2):
        b.failure()
    assert b.allow() and not b.is_open
    b.failure()
    assert b.is_open and not b.allow()
    now[0] = 5.0
    assert b.allow()  # half-open: one probe
    assert not b.allow()  # the others still fail fast
    b.success()
    assert not b.is_open and b.allow()


def test_the_skip_rule_compares_measured_load_time_with_recomputing() -> None:
    assert should_load(10_000_000, None, 0.001)  # unmeasured: load (and measure)
    assert should_load(10_000_000, 1e9, None)
    assert should_load(10_000_000, 1e9, 0.02)  # 10 ms to load vs 20 ms to recompute
    assert not should_load(10_000_000, 1e8, 0.02)  # 100 ms to load: recompute


# ---- the stack -----------------------------------------------------------------------------------


class _Named(DiskTier):
    def __init__(self, name: str, *args, **kwargs) -> None:
        self.name = name
        super().__init__(*args, **kwargs)


def test_the_stack_loads_the_longest_verified_run_across_tiers(tmp_path: Path) -> None:
    fast = _Named("fast", tmp_path / "a", 1 << 30)
    slow = _Named("slow", tmp_path / "b", 1 << 30)
    stack = TierStack([fast, slow], NS, LAYOUT, BLOCK, skip_slower=False)
    hs = chain(6)
    for i in (0, 1):
        stack.store(hs[i], payload(i), 0.0, only=["fast"])
    for i in (2, 3, 4, 5):
        stack.store(hs[i], payload(i), 0.0, only=["slow"])
    assert stack.flush()
    p = slow._path(hs[4])  # a flipped byte in the slow tier's fifth block
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    run = stack.load(hs)
    assert run.tiers == ["fast", "fast", "slow", "slow"]
    assert [bytes(x) for x in run.payloads] == [bytes(payload(i)) for i in range(4)]
    assert stack.counters["slow"].corrupt == 1 and not p.exists()  # discarded, never served
    assert stack.counters["fast"].hit_blocks == 2 and stack.counters["slow"].hit_blocks == 2
    assert stack.counters["slow"].miss_blocks == 2
    stack.load(hs[:1])  # a verified load refreshes recency (through the writer's touch)
    assert stack.flush() and fast.stored_hashes()[-1] == hs[0]
    stack.close()


def test_a_full_write_queue_drops_and_counts(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, 1 << 30, write_delay_s=0.2)  # the writer is busy with the first write
    stack = TierStack([disk], NS, LAYOUT, BLOCK, max_queue_bytes=2 * BLOCK)
    hs = chain(5)
    for i, h in enumerate(hs):
        stack.store(h, payload(i), 0.0)
    assert stack.flush()
    c = stack.counters["disk"]
    assert c.dropped_writes >= 2 and c.writes + c.dropped_writes == 5 and c.queued_bytes == 0
    assert disk.chain(hs[: c.writes]) >= 1
    stack.close()


def test_writes_never_block_the_caller(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, 1 << 30, write_delay_s=1.0)
    stack = TierStack([disk], NS, LAYOUT, BLOCK)
    done = threading.Event()

    def producer() -> None:
        for i, h in enumerate(chain(3)):
            stack.store(h, payload(i), 0.0)
        done.set()

    threading.Thread(target=producer).start()
    assert done.wait(0.9)  # three writes of 1 s each were queued without waiting for one
    assert stack.flush()
    stack.close()
