"""Tiers below the in-memory pool: the interface, the stack that moves objects to and from them.

A tier stores self-describing objects (cache/tier_format.py) by their block's chained hash — the
same address the memory index uses, so it is namespaced per model and tenant and reproducible
across processes. The stack (``TierStack``) owns what every tier shares:

- **writes behind the step**: each tier has one writer thread and a queue bounded in bytes; a full
  queue drops the write (counted), the step that produced the block never waits;
- **loads**: the longest run of blocks, from the first hash on, that the tiers hold — each block
  from the cheapest tier that has it, checksum verified; a corrupt object is deleted and counted,
  and the run ends at the last good block;
- **the skip rule**: a run whose load would take longer than recomputing it is not loaded;
- counters per tier.

Torch-free: payloads are buffers (``memoryview``); the engine turns them into tensors.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from promptcache.cache.hashing import BlockHash
from promptcache.cache.tier_format import CorruptObject, decode_header, encode_header, verify

log = logging.getLogger(__name__)


class TierError(RuntimeError):
    """A tier could not answer (down, timed out, circuit open): the caller treats it as a miss."""


class Tier(Protocol):
    name: str

    def chain(self, hashes: Sequence[BlockHash]) -> int:
        """How many of ``hashes``, from the first on, this tier holds."""
        ...

    def get_many(self, hashes: Sequence[BlockHash]) -> list[bytes | None]:
        """The stored objects (header + payload), None where absent."""
        ...

    def put(self, block_hash: BlockHash, header: bytes, payload: memoryview, ttl_s: float) -> None: ...

    def touch(self, block_hash: BlockHash, ttl_s: float) -> None:
        """The block was just used: refresh its recency and keep it at least ``ttl_s`` from now."""
        ...

    def delete(self, block_hash: BlockHash) -> None: ...

    def gauges(self) -> dict[str, int]:
        """Current sizes (objects, bytes) where the tier knows them."""
        ...

    def close(self) -> None: ...


def contains(tier: Tier, block_hash: BlockHash) -> bool:
    return tier.chain([block_hash]) == 1


def get(tier: Tier, block_hash: BlockHash) -> bytes | None:
    return tier.get_many([block_hash])[0]


@dataclass
class TierCounters:
    hit_blocks: int = 0  # blocks loaded from this tier into memory
    miss_blocks: int = 0  # blocks asked of the stack that no tier supplied (counted on the last tier)
    bytes_read: int = 0
    bytes_written: int = 0
    writes: int = 0
    load_seconds: float = 0.0  # time spent reading + verifying what was loaded
    loads: int = 0  # runs loaded
    errors: int = 0  # tier down / timed out / refused
    corrupt: int = 0  # objects discarded: torn, truncated, flipped, mismatched
    dropped_writes: int = 0  # a full queue (or an open circuit) dropped a write
    skipped_slower: int = 0  # runs not loaded: recomputing was estimated faster
    queued_bytes: int = 0  # gauge

    def add(self, **deltas: float) -> None:
        """Counters are bumped by the engine, loader and writer threads: under one lock."""
        with _COUNTER_LOCK:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)


_COUNTER_LOCK = threading.Lock()
PROBE_EVERY = 16  # a tier skipped as slower is loaded anyway once in this many runs: its rate is re-measured


@dataclass
class _Write:
    block_hash: BlockHash
    payload: memoryview
    ttl_s: float
    header_fields: tuple[bytes, bytes, float]  # namespace, layout, written_at
    _header: bytes | None = None

    @property
    def header(self) -> bytes:
        """Encoded (the payload's checksum computed) on a writer thread, once for every tier."""
        if self._header is None:
            ns, layout, written_at = self.header_fields
            self._header = encode_header(ns, self.block_hash, layout, self.ttl_s, written_at, self.payload)
        return self._header


class _Writer:
    """One tier's background writer: puts and touches in order, bounded by queued payload bytes."""

    def __init__(self, tier: Tier, counters: TierCounters, max_queue_bytes: int) -> None:
        self.tier, self.counters, self.max_queue_bytes = tier, counters, max_queue_bytes
        self._queue: deque[_Write | tuple[BlockHash, float]] = deque()
        self._cv = threading.Condition()
        self._busy = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"promptcache-{tier.name}-writer", daemon=True)
        self._thread.start()

    def put(self, write: _Write) -> bool:
        with self._cv:
            if self.counters.queued_bytes + write.payload.nbytes > self.max_queue_bytes:
                self.counters.add(dropped_writes=1)
                return False
            self.counters.add(queued_bytes=write.payload.nbytes)
            self._queue.append(write)
            self._cv.notify()
        return True

    def touch(self, block_hash: BlockHash, ttl_s: float) -> None:
        with self._cv:
            if len(self._queue) < 65536:  # touches are hints: never unbounded
                self._queue.append((block_hash, ttl_s))
                self._cv.notify()

    def flush(self, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if not self._queue:
                    return
                op = self._queue.popleft()
                self._busy = True
            try:
                if isinstance(op, _Write):
                    self.tier.put(op.block_hash, op.header, op.payload, op.ttl_s)
                    self.counters.add(writes=1, bytes_written=len(op.header) + op.payload.nbytes)
                else:
                    self.tier.touch(*op)
            except TierError:
                self.counters.add(errors=1, dropped_writes=int(isinstance(op, _Write)))
            except Exception:  # a bug in a tier must not kill its writer
                log.exception("%s tier: write failed", self.tier.name)
                self.counters.add(errors=1)
            finally:
                with self._cv:
                    if isinstance(op, _Write):
                        self.counters.add(queued_bytes=-op.payload.nbytes)
                    self._busy = False
                    self._cv.notify_all()


@dataclass
class LoadedRun:
    """What ``TierStack.load`` found: payloads for ``hashes[:len(payloads)]``, each block's tier and
    retention."""

    payloads: list[memoryview] = field(default_factory=list)
    tiers: list[str] = field(default_factory=list)
    ttls: list[float] = field(default_factory=list)  # each block's retention, from its header
    skipped: str | None = None  # the tier whose run was not loaded because recomputing is faster


def should_load(num_bytes: int, bytes_per_s: float | None, recompute_s: float | None) -> bool:
    """The skip rule: load unless the tier's measured rate (lookup, read and checksum, per byte)
    makes it slower than recomputing. Unmeasured (no load yet, or no step timed yet) means load:
    the first load measures the rate."""
    if bytes_per_s is None or recompute_s is None or bytes_per_s <= 0:
        return True
    return num_bytes / bytes_per_s <= recompute_s


class TierStack:
    """Lower tiers in lookup order (cheapest first), their writers and counters."""

    def __init__(self, tiers: Sequence[Tier], namespace: bytes, layout: bytes, block_bytes: int,
                 max_queue_bytes: int = 256 << 20, skip_slower: bool = True,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.tiers = list(tiers)
        self.namespace, self.layout, self.block_bytes = namespace, layout, block_bytes
        self.skip_slower = skip_slower
        self.wall_clock = wall_clock
        self.counters = {t.name: TierCounters() for t in self.tiers}
        self._writers = {t.name: _Writer(t, self.counters[t.name], max_queue_bytes) for t in self.tiers}
        self._rate: dict[str, float] = {}  # tier -> measured load bytes/s, lookup included (EWMA)
        self._skips: dict[str, int] = {}  # tier -> runs skipped since it was last measured

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tiers]

    # ---- writes (engine thread: enqueue only) --------------------------------------------------

    def store(self, block_hash: BlockHash, payload: memoryview, ttl_s: float,
              only: Sequence[str] | None = None) -> None:
        """Queue one block for every tier (or the tiers named in ``only``)."""
        write = _Write(block_hash, payload, ttl_s, (self.namespace, self.layout, self.wall_clock()))
        for t in self.tiers:
            if only is None or t.name in only:
                self._writers[t.name].put(write)

    def touch(self, block_hash: BlockHash, ttl_s: float) -> None:
        for w in self._writers.values():
            w.touch(block_hash, ttl_s)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued write is done (tests, shutdown)."""
        return all(w.flush(timeout_s) for w in self._writers.values())

    # ---- loads (a loader thread) ---------------------------------------------------------------

    def load(self, hashes: Sequence[BlockHash], recompute_s_per_block: float | None = None) -> LoadedRun:
        """The longest run of ``hashes`` (from the first) the tiers hold, verified."""
        run = LoadedRun()
        i = 0
        while i < len(hashes):
            got = 0
            for tier in self.tiers:
                got = self._load_from(tier, hashes[i:], run, recompute_s_per_block)
                if got:
                    break
                if run.skipped is not None:
                    break
            if not got:
                break
            i += got
        if i < len(hashes) and self.tiers and run.skipped is None:
            self.counters[self.tiers[-1].name].add(miss_blocks=len(hashes) - i)
        return run

    def _load_from(self, tier: Tier, hashes: Sequence[BlockHash], run: LoadedRun,
                   recompute_s_per_block: float | None) -> int:
        c = self.counters[tier.name]
        t0 = time.perf_counter()
        try:
            n = tier.chain(hashes)
            if n == 0:
                return 0
            recompute = None if recompute_s_per_block is None else n * recompute_s_per_block
            if self.skip_slower and not should_load(n * self.block_bytes, self._rate.get(tier.name), recompute):
                skips = self._skips.get(tier.name, 0) + 1
                self._skips[tier.name] = skips
                if skips < PROBE_EVERY:  # else: load anyway, and measure again
                    c.add(skipped_slower=1)
                    run.skipped = tier.name
                    return 0
            self._skips[tier.name] = 0
            objs = tier.get_many(hashes[:n])
        except TierError:
            c.add(errors=1)
            return 0
        good = 0
        for h, obj in zip(hashes[:n], objs, strict=True):
            if obj is None:
                break  # deleted between chain() and get (evicted, expired, another writer)
            try:
                payload = verify(obj, self.namespace, h, self.layout, self.block_bytes)
            except CorruptObject as e:
                c.add(corrupt=1)
                log.warning("%s tier: discarding a corrupt object for block %s: %s", tier.name, h.hex()[:16], e)
                try:
                    tier.delete(h)
                except TierError:
                    c.add(errors=1)
                break
            ttl = decode_header(obj).ttl_s
            run.payloads.append(payload)
            run.tiers.append(tier.name)
            run.ttls.append(ttl)
            c.add(bytes_read=len(obj))
            self._writers[tier.name].touch(h, ttl)  # used now: refresh its recency / Redis TTL
            good += 1
        if good:
            dt = time.perf_counter() - t0
            c.add(hit_blocks=good, loads=1, load_seconds=dt)
            self._measure(tier.name, good * self.block_bytes, dt)
        return good

    def _measure(self, name: str, num_bytes: int, seconds: float) -> None:
        rate = num_bytes / max(seconds, 1e-9)
        old = self._rate.get(name)
        self._rate[name] = rate if old is None else 0.7 * old + 0.3 * rate

    # ---- inspection ----------------------------------------------------------------------------

    def stats(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for t in self.tiers:
            c = self.counters[t.name]
            row: dict[str, float] = dict(vars(c))
            with contextlib.suppress(TierError):
                row.update(t.gauges())
            out[t.name] = row
        return out

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        for t in self.tiers:
            t.close()
