"""Continuous batching with chunked prefill, prefix reuse and preemption by recompute.

Each step spends a token budget in this order: running decodes (streams keep flowing while a long
prompt is chunked); waiting requests that are *short* once their cache hit is taken off (a cache hit
should not queue behind someone else's long cold prefill; they may use at most half the budget, so
long prefills still progress); running partial prefills; then the other waiting requests, in
arrival order.
A waiting request whose next blocks are being computed by a running request waits for them
(bounded by ``inflight_wait_s``) instead of computing the same prefix twice — and joins the step
that finishes them: a layer writes all of a step's K/V before any attention reads, so it reads them
where its owner writes them, a step sooner.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from promptcache.cache import KVCacheManager
from promptcache.engine.config import EngineConfig
from promptcache.engine.request import Request, Status
from promptcache.engine.usage import UsageLedger

if TYPE_CHECKING:
    from promptcache.engine.tiering import KVTiers


@dataclass(frozen=True)
class ScheduledChunk:
    request: Request
    num_tokens: int  # run tokens [num_computed_tokens, num_computed_tokens + num_tokens)

    @property
    def reaches_end(self) -> bool:
        """This chunk ends at the request's last token, so its logits give the next token."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


class Scheduler:
    def __init__(
        self, config: EngineConfig, kv: KVCacheManager, clock: Callable[[], float], usage: UsageLedger,
        tiers: KVTiers | None = None,
    ) -> None:
        self.tiers = tiers  # lower tiers: a request whose memory hit ends early may wait for a load
        self.config = config
        self.kv = kv
        self.usage = usage
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request, reason: str) -> None:
        request.status = Status.FINISHED
        request.finish_reason = reason
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request.request_id)

    # ---- one step ------------------------------------------------------------------------------

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.config.scheduler.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: set[str] = set()
        decodes = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        prefills = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        budget = self._run(decodes, budget, chunks, scheduled)
        short_limit = budget // 2
        budget -= short_limit - self._admit_waiting(short_limit, chunks, scheduled, short_only=True)
        budget = self._run(prefills, budget, chunks, scheduled)
        self._admit_waiting(budget, chunks, scheduled, short_only=False)
        return chunks

    def _run(self, reqs: list[Request], budget: int, chunks: list[ScheduledChunk], scheduled: set[str]) -> int:
        for req in reqs:
            if budget == 0:
                break
            if req.request_id in scheduled or req.status is not Status.RUNNING:
                continue  # preempted earlier in this step
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._grow(req, num_new, scheduled):
                continue
            chunks.append(ScheduledChunk(req, num_new))
            scheduled.add(req.request_id)
            budget -= num_new
        return budget

    def _grow(self, req: Request, num_new: int, scheduled: set[str]) -> bool:
        """Make room for ``num_new`` more tokens of a running request, preempting newer ones."""
        while self.kv.allocate(req.request_id, req.num_computed_tokens + num_new) is None:
            victims = [r for r in self.running if r.request_id not in scheduled and r is not req]
            victim = victims[-1] if victims else req
            self.preempt(victim)
            if victim is req:
                return False
        return True

    def preempt(self, req: Request) -> None:
        """Drop a running request's blocks (they stay cached) and queue it to be recomputed first."""
        self.kv.free(req.request_id)
        self.running.remove(req)
        req.status = Status.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _admit_waiting(
        self, budget: int, chunks: list[ScheduledChunk], scheduled: set[str], short_only: bool
    ) -> int:
        """Admit waiting requests in arrival order while budget and memory last; return the budget left.

        With ``short_only``, only requests whose uncached rest fits the budget whole are admitted; the
        others keep their place in the queue.
        """
        held_back: list[Request] = []
        now = self.clock()
        while self.waiting and budget > 0 and len(self.running) < self.config.scheduler.max_num_seqs:
            req = self.waiting.popleft()
            hit = self.kv.match(req.request_id, req.block_hashes, req.num_tokens)
            if self.tiers is not None and self.tiers.hold(req, hit):
                held_back.append(req)  # the rest of its prefix is being loaded from disk / Redis
                continue
            if hit.num_inflight_blocks:
                ends = {c.request.request_id: c.request.num_computed_tokens + c.num_tokens for c in chunks}
                joined = self.kv.join_inflight(req.block_hashes, req.num_tokens, hit, ends)
                if joined is not None:
                    hit = joined  # this step computes the rest of its prefix: run beside it, reading it
                elif self._may_wait(req, now):
                    held_back.append(req)  # its prefix is being computed right now: reuse it instead
                    continue
            if short_only and req.num_tokens - hit.num_tokens > budget:
                held_back.append(req)
                continue
            num_new = min(req.num_tokens - hit.num_tokens, budget)
            # the full prompt blocks it will compute: others wanting them wait for this request
            inflight = req.block_hashes[len(hit.blocks) : req.num_prompt_blocks]
            ids = self.kv.allocate(
                req.request_id, hit.num_tokens + num_new, hit, req.retention, inflight_hashes=inflight
            )
            if ids is None:
                self.waiting.appendleft(req)  # first come, first served: nobody jumps the queue
                break
            req.num_computed_tokens = hit.num_tokens
            by_tier = self.tiers.admitted(req, hit) if self.tiers is not None else {}
            self.usage.admitted(req, hit.num_tokens, first=req.first_scheduled_time is None, stop=hit.stop,
                                by_tier=by_tier)
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            req.status = Status.RUNNING
            req.wait_started = None
            self.running.append(req)
            chunks.append(ScheduledChunk(req, num_new))
            scheduled.add(req.request_id)  # never preempted by a later grow in this same step
            budget -= num_new
        self.waiting.extendleft(reversed(held_back))
        return budget

    def _may_wait(self, req: Request, now: float) -> bool:
        if req.wait_started is None:
            req.wait_started = now
        return now - req.wait_started < self.config.cache.inflight_wait_s
