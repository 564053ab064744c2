"""Moving blocks between memory and the tiers below it (disk, Redis), for the engine.

The bookkeeping lives in ``cache/`` (what a tier holds, what it costs, whether an object is
intact); this module is the glue that sees both block ids and the runner's tensors.

**Writes** happen behind the step: when a request indexes a block that the admission rule takes
(``prompt``: every full prompt block; ``retained``: only blocks under a retention or breakpoint),
the step copies its K/V to host memory once and queues it for every tier's writer thread.

**Loads** happen beside the steps. When a waiting request's memory hit ends early, the scheduler
asks ``hold()``: the blocks right after the hit are *promised* to a loader (so other requests
wanting them wait instead of computing or loading them again — in-flight sharing covers loads),
the memory hit is pinned, and a loader thread reads and verifies the longest run the tiers hold.
The next step's ``poll()`` copies the run into fresh blocks and indexes them; the request, admitted
on a later pass, finds them as an ordinary memory hit. A failed or corrupt block ends the run: the
request computes from the last good block. The loader's pins are dropped once it is admitted.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from promptcache.cache import BELOW_ONE_BLOCK, IN_FLIGHT, REUSED_ALL, BlockHash, CacheHit, KVCacheManager
from promptcache.cache.disk_tier import DiskTier
from promptcache.cache.namespace import KV_LAYOUT, Namespace
from promptcache.cache.tier_format import digest, layout_digest
from promptcache.cache.tiers import LoadedRun, Tier, TierStack
from promptcache.engine.config import TierConfig
from promptcache.engine.model_runner import ModelRunner
from promptcache.engine.precision import dtype_name
from promptcache.engine.request import Request
from promptcache.flags import parse_bytes

log = logging.getLogger(__name__)
WRITE_DELAY_ENV = "PROMPTCACHE_TEST_DISK_WRITE_DELAY_S"  # test hook: crash a server mid-write


@dataclass
class _Job:
    request_id: str
    owner: str  # the manager table that pins the hit and holds the loaded blocks
    start: int  # block index where the load begins (the memory hit's length)
    hashes: list[BlockHash]  # the request's block hashes up to the last loadable block
    run: LoadedRun | None = None
    applied: bool = False
    cancelled: bool = False
    loaded: dict[int, str] = field(default_factory=dict)  # block id -> the tier its content came from


def build_tiers(config: TierConfig) -> list[Tier]:
    tiers: list[Tier] = []
    if config.disk_cache is not None:
        delay = float(os.environ.get(WRITE_DELAY_ENV, "0") or 0) or config.disk_write_delay_s
        tiers.append(DiskTier(config.disk_cache, parse_bytes(config.disk_cache_size), fsync=config.disk_cache_fsync,
                              write_delay_s=delay))
    if config.redis_url is not None:
        from promptcache.cache.redis_tier import RedisTier  # the redis client only when asked for

        tiers.append(RedisTier(config.redis_url, config.redis_ttl, config.redis_timeout,
                               cooldown_s=config.redis_cooldown))
    return tiers


class KVTiers:
    def __init__(self, config: TierConfig, runner: ModelRunner, namespace: Namespace, kv: KVCacheManager,
                 tiers: list[Tier] | None = None) -> None:
        self.config = config
        self.runner, self.kv = runner, kv
        self.block_size = runner.block_size
        arch = runner.loaded.arch
        layout = layout_digest(dtype_name(runner.kv_dtype), arch.num_layers, arch.num_kv_heads, arch.head_dim,
                               runner.block_size, KV_LAYOUT)
        self.stack = TierStack(tiers if tiers is not None else build_tiers(config), digest(namespace.key), layout,
                               runner.block_bytes, parse_bytes(config.tier_write_queue), config.tier_skip_slower)
        self._jobs: dict[str, _Job] = {}
        self._ready: list[_Job] = []
        self._ready_lock = threading.Lock()
        self._ready_event = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="promptcache-tier-load")
        self._writes: list[tuple[int, BlockHash, float]] = []  # (block id, hash, ttl) queued this step
        self._s_per_token: float | None = None  # measured model time per computed token (EWMA)
        self._seq = itertools.count()  # loader tables are unique per job, never per request id
        self.on_ready: Callable[[], None] | None = None  # wakes an idle engine loop (AsyncEngine)
        kv.pool.on_evict = self._evicted

    # ---- loads ---------------------------------------------------------------------------------

    def hold(self, req: Request, hit: CacheHit) -> bool:
        """Should this waiting request wait for a load? Starts one the first time its memory hit
        ends before what the tiers might hold."""
        job = self._jobs.get(req.request_id)
        if job is not None:
            return not job.applied
        if req.tier_probed or hit.stop.reason in (REUSED_ALL, BELOW_ONE_BLOCK, IN_FLIGHT):
            return False
        req.tier_probed = True
        max_hit = (req.num_tokens - 1) // self.block_size  # the last token always runs
        start = len(hit.blocks)
        if start >= max_hit:
            return False
        hashes = req.block_hashes[:max_hit]
        owner = f"tier-load:{next(self._seq)}:{req.request_id}"
        # pin the memory hit, promise the rest: nobody computes or loads them twice meanwhile
        self.kv.allocate(owner, hit.num_tokens, hit, req.retention, inflight_hashes=hashes[start:])
        job = _Job(req.request_id, owner, start, hashes)
        self._jobs[req.request_id] = job
        per_block = None if self._s_per_token is None else self._s_per_token * self.block_size
        self._pool.submit(self._load, job, per_block)
        return True

    def _load(self, job: _Job, recompute_s_per_block: float | None) -> None:
        try:
            job.run = self.stack.load(job.hashes[job.start :], recompute_s_per_block)
        except Exception:  # a bug in a tier costs a miss, never the engine
            log.exception("tier load failed")
            job.run = LoadedRun()
        with self._ready_lock:
            self._ready.append(job)
        self._ready_event.set()
        if self.on_ready is not None:
            self.on_ready()

    def poll(self) -> None:
        """Engine thread, before scheduling: put finished loads into memory."""
        with self._ready_lock:
            ready, self._ready = self._ready, []
            self._ready_event.clear()
        for job in ready:
            if job.cancelled:
                self.kv.free(job.owner)
                continue
            self._apply(job)

    def _apply(self, job: _Job) -> None:
        """Copy the loaded run into fresh blocks and index them, then drop the loader's table: the
        blocks stay cached like any others (evictable: a waiting request never pins memory that the
        head of the queue may need)."""
        run = job.run or LoadedRun()
        bs = self.block_size
        table = self.kv.block_ids(job.owner) if job.owner in self.kv.tables else None
        # as much of the run as memory holds now (the rest is recomputed: still correct)
        n = min(len(run.payloads), self.kv.num_free_blocks) if table is not None and len(table) == job.start else 0
        ids = self.kv.allocate(job.owner, (job.start + n) * bs) if n else []
        if ids:
            self.runner.write_blocks(ids, run.payloads[:n])
            self.kv.commit(job.owner, job.hashes, (job.start + n) * bs)
            job.loaded = dict(zip(ids, run.tiers[:n], strict=True))
            # promote what came from a slower tier into the faster ones before it
            names = self.stack.names
            for i in range(n):
                faster = names[: names.index(run.tiers[i])]
                if faster:
                    self.stack.store(job.hashes[job.start + i], run.payloads[i], run.ttls[i], only=faster)
        self.kv.free(job.owner)
        job.applied = True

    def admitted(self, req: Request, hit: CacheHit) -> dict[str, int]:
        """The request took its hit: how many of its tokens each lower tier supplied (the loaded
        blocks that are still the ones the hit found)."""
        job = self._jobs.pop(req.request_id, None)
        if job is None:
            return {}
        used = Counter(job.loaded[b.block_id] for b in hit.blocks[job.start :] if b.block_id in job.loaded)
        return {name: n * self.block_size for name, n in used.items()}

    def forget(self, request_id: str) -> None:
        """The request finished or was aborted: drop its load (its table is freed when the loader
        returns, if it has not yet)."""
        job = self._jobs.pop(request_id, None)
        if job is not None and not job.applied:
            job.cancelled = True

    def loading(self) -> bool:
        return any(not j.applied for j in self._jobs.values())

    def wait(self, timeout_s: float) -> None:
        """Nothing to run but loads in flight: sleep until one is ready (instead of spinning)."""
        self._ready_event.wait(timeout_s)

    # ---- writes --------------------------------------------------------------------------------

    def indexed(self, req: Request, newly_indexed: list[int]) -> None:
        """Blocks the request just made findable in memory: queue those the admission rule takes."""
        table_ids = None
        for i in newly_indexed:
            ttl = req.retention.ttl_for_block(i, self.block_size)
            if self.config.tier_admission == "prompt":
                if i >= req.num_prompt_blocks:
                    continue
            elif ttl <= 0:
                continue
            if table_ids is None:
                table_ids = self.kv.block_ids(req.request_id)
            self._writes.append((table_ids[i], req.block_hashes[i], ttl))

    def begin_step(self) -> None:
        """Before a step: writes queued by a step that failed half-way name blocks that an abort
        may have freed since (their ids now hold other content): never store them."""
        self._writes.clear()

    def times(self, num_tokens: int) -> bool:
        """Is a step of this many tokens timed (prefill-sized: its per-token time means something)?"""
        return num_tokens >= 4 * self.block_size

    def end_step(self, num_tokens: int, seconds: float) -> None:
        """After the step's model run: time it (the recompute side of the skip rule), copy the
        step's new blocks to host memory and queue them."""
        if self.times(num_tokens):  # on a GPU the caller synchronised before reading its clock
            rate = seconds / num_tokens
            self._s_per_token = rate if self._s_per_token is None else 0.8 * self._s_per_token + 0.2 * rate
        if not self._writes:
            return
        writes, self._writes = self._writes, []
        payloads = self.runner.read_blocks([w[0] for w in writes])
        for (_, h, ttl), payload in zip(writes, payloads, strict=True):
            self.stack.store(h, payload, ttl)

    def _evicted(self, block_hash: BlockHash, retention_left_s: float) -> None:
        """Memory dropped a block: it was in use until recently, so the tiers refresh its recency
        (disk LRU, Redis TTL) and keep it at least as long as its retention had left."""
        self.stack.touch(block_hash, retention_left_s)

    # ---- inspection ----------------------------------------------------------------------------

    def stats(self) -> dict[str, dict[str, float]]:
        return self.stack.stats()

    def flush(self, timeout_s: float = 30.0) -> bool:
        return self.stack.flush(timeout_s)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._pool.shutdown(wait=True, cancel_futures=True)
        self.stack.close()

