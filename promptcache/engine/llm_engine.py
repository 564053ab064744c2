"""The synchronous engine: add requests, call ``step()`` until they finish.

One step is: schedule -> run the model -> commit newly full blocks and process outputs.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Any

from promptcache.cache import KVCacheManager, hash_blocks
from promptcache.cache.namespace import Namespace, model_identity
from promptcache.engine.config import EngineConfig
from promptcache.engine.info import EngineInfo, EngineStats
from promptcache.engine.model_runner import ModelRunner, SeqInput
from promptcache.engine.output import OutputState
from promptcache.engine.precision import describe as describe_precision
from promptcache.engine.precision import dtype_name, hardware_key
from promptcache.engine.request import Request, RequestOutput, RequestSpec, Status
from promptcache.engine.scheduler import ScheduledChunk, Scheduler
from promptcache.engine.structured import Grammars, Matcher
from promptcache.engine.tiering import KVTiers
from promptcache.engine.usage import UsageLedger
from promptcache.tokenizer import Tokenizer

PIN_PREFIX = "pin:"  # the cache manager tables of pins (request ids may not start with it)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or EngineConfig()
        self.runner = ModelRunner(self.config)
        self.tokenizer = Tokenizer(self.runner.model_dir)
        self.max_model_len = self.runner.max_model_len
        self.block_size = self.config.cache.block_size
        index = "hash" if self.config.cache.enable_prefix_caching else "none"  # cache/index.py
        self.kv = KVCacheManager(self.runner.num_blocks, self.block_size, index, clock)
        self.usage = UsageLedger(self.block_size)  # every usage and counter rule (engine/usage.py)
        self.eos_token_ids = self._eos_ids()
        self.runner.sampler.eos_token_ids = sorted(self.eos_token_ids)
        # constrained decoding (structured output, forced tool calls): engine/structured.py
        self.grammars = Grammars(str(self.runner.model_dir / "tokenizer.json"), self.runner.loaded.arch.vocab_size,
                                 sorted(self.eos_token_ids))
        self.model_name = self.config.model.model or "default"
        # what every block hash is chained from: model content, dtypes, layout, mode (cache/namespace.py)
        r = self.runner
        self.namespace = Namespace(
            model=model_identity(r.model_dir),
            compute_dtype=dtype_name(r.compute_dtype),
            kv_dtype=dtype_name(r.kv_dtype),
            weights_dtype=dtype_name(r.dtype),
            device=hardware_key(r.device),
            deterministic=self.config.model.deterministic,
            seed=self.config.cache.hash_seed,
            linears=r.loaded.linears,
        )
        # disk / Redis below memory (engine/tiering.py); None when neither is configured
        tiers_on = self.config.tiers.enabled and self.config.cache.enable_prefix_caching  # nothing to load into
        self.tiers = KVTiers(self.config.tiers, r, self.namespace, self.kv) if tiers_on else None
        self.scheduler = Scheduler(self.config, self.kv, clock, self.usage, self.tiers)
        self.precision = describe_precision(r.dtype, r.compute_dtype, r.kv_dtype, r.device) + (
            ", deterministic" if self.config.model.deterministic else ""
        )
        self._outputs: dict[str, OutputState] = {}
        self._requests: dict[str, Request] = {}
        self._pins: dict[str, float] = {}  # pin id -> when it expires (clock)
        self._num_pinned = 0  # distinct blocks the pins hold
        self._clock = clock

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (self.runner.loaded.generation_config, self.runner.loaded.hf_config):
            eos = src.get("eos_token_id")
            if eos is not None:
                ids.update(eos if isinstance(eos, list) else [eos])
                break
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # ---- requests ------------------------------------------------------------------------------

    def validate(self, spec: RequestSpec) -> None:
        """Raise ValueError (never later) for a request that can never run. Pure: any thread."""
        prompt_token_ids, params = spec.prompt_token_ids, spec.params
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens but the model's context is {self.max_model_len} tokens "
                "(the prompt must leave room for at least one generated token)"
            )
        vocab = self.runner.loaded.arch.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the model's vocabulary [0, {vocab})")
        bad = next((t for t in params.logit_bias if t >= vocab), None)
        if bad is not None:
            raise ValueError(f"logit_bias: token id {bad} is outside the model's vocabulary [0, {vocab})")
        worst = min(n + params.max_tokens, self.max_model_len)
        need = self.kv.blocks_needed(worst)
        if need > self.kv.pool.num_blocks:
            raise ValueError(
                f"the request needs {need} KV blocks ({n} prompt + {params.max_tokens} max tokens) but "
                f"the cache has only {self.kv.pool.num_blocks}; raise --kv-cache-memory or lower max_tokens"
            )
        pinned = self._num_pinned  # an int written by the engine thread: safe to read from any thread
        if pinned and need > self.kv.pool.num_blocks - pinned:  # it could never run while the pins live
            raise ValueError(
                f"the request needs {need} KV blocks ({n} prompt + {params.max_tokens} max tokens) but only "
                f"{self.kv.pool.num_blocks - pinned} of the cache's {self.kv.pool.num_blocks} are not pinned by "
                "cached contents; lower max_tokens, or delete a cached content"
            )

    def add_request(self, spec: RequestSpec, matcher: Matcher | None = None) -> Request:
        """Queue a request. ``matcher``: its structured output's grammar, compiled by the caller
        (``AsyncEngine`` does it off this thread); compiled here when not given."""
        request_id = spec.request_id
        if request_id in self._requests or request_id.startswith(PIN_PREFIX):
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate(spec)
        if spec.params.structured is not None and matcher is None:
            matcher = self.grammars.matcher(spec.params.structured)
        root = self.namespace.root(spec.tenant)
        req = Request(request_id, spec.prompt_token_ids, spec.params, root, self.block_size, spec.retention,
                      self.config.cache.hash_seed)
        self._requests[request_id] = req
        self._outputs[request_id] = OutputState(req, self.tokenizer, self.eos_token_ids)
        if matcher is not None:
            self.runner.sampler.constrain(request_id, matcher)
        self.usage.added(req)
        self.scheduler.add(req)
        return req

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its blocks (a client went away). False if it is unknown."""
        req = self._requests.get(request_id)
        if req is None:
            return False
        self._finish(req, "abort")
        self._cleanup(req)
        return True

    def abort_all(self) -> None:
        for request_id in list(self._requests):
            self.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if self.tiers is not None:
            self.tiers.begin_step()
            self.tiers.poll()  # finished loads from disk / Redis go into memory before scheduling
        chunks = self.scheduler.schedule()
        if not chunks:
            if self.tiers is not None and self.tiers.loading():
                self.tiers.wait(0.01)  # only loads in flight: sleep until one lands, do not spin
            return []
        started = time.perf_counter()
        results = self.runner.execute([self._seq_input(c) for c in chunks])
        num_tokens = sum(c.num_tokens for c in chunks)
        if self.tiers is not None and self.tiers.times(num_tokens):
            self.runner.synchronize()  # the skip rule times this step: on a GPU, wait for its kernels
        seconds = time.perf_counter() - started
        outputs = []
        for chunk in chunks:
            out = self._after_chunk(chunk, results.get(chunk.request.request_id))
            if out is not None:
                outputs.append(out)
        if self.tiers is not None:
            self.tiers.end_step(num_tokens, seconds)
        return outputs

    def _seq_input(self, chunk: ScheduledChunk) -> SeqInput:
        req = chunk.request
        start = req.num_computed_tokens
        return SeqInput(
            request_id=req.request_id,
            token_ids=req.all_token_ids[start : start + chunk.num_tokens],
            start_pos=start,
            block_ids=self.kv.block_ids(req.request_id),
            sample=chunk.reaches_end and req.params.max_tokens > 0,
            params=req.params,
        )

    def _after_chunk(self, chunk: ScheduledChunk, result) -> RequestOutput | None:
        req = chunk.request
        reaches_end = chunk.reaches_end
        req.num_computed_tokens += chunk.num_tokens
        self.usage.computed(chunk.num_tokens)
        newly = self.kv.commit(req.request_id, req.block_hashes, req.num_computed_tokens)
        self.usage.indexed(req, newly)
        if newly and self.tiers is not None:
            self.tiers.indexed(req, newly)
        if not reaches_end:
            return None
        if req.params.max_tokens == 0:  # pre-warm: the prompt is cached, nothing to generate
            self._finish(req, "length")
            return self._output(req)
        token, logprob = result
        req.append_token(token)
        self.usage.generated(req)
        if req.logprobs is not None and logprob is not None:
            req.logprobs.append(logprob)
        reason = self._outputs[req.request_id].on_token(token, self.max_model_len)
        if reason is None and self.runner.sampler.grammar_done(req.request_id):
            reason = "stop"  # the structured output is complete
        if reason is not None:
            self._finish(req, reason)
        return self._output(req)

    def _finish(self, req: Request, reason: str) -> None:
        if req.is_finished:
            return
        self.usage.finished(req, reason, ran=req.first_scheduled_time is not None)
        self.scheduler.finish(req, reason)
        self._outputs[req.request_id].finish_text(reason)
        self.runner.sampler.forget(req.request_id)
        if self.tiers is not None:
            self.tiers.forget(req.request_id)

    def _cleanup(self, req: Request) -> None:
        self._requests.pop(req.request_id, None)
        self._outputs.pop(req.request_id, None)

    def _output(self, req: Request) -> RequestOutput:
        state = self._outputs[req.request_id]
        finished = req.status is Status.FINISHED
        new_text, new_tokens = state.take_new(finished)
        out = RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            text=state.text if finished else state.text[: state.num_emitted_chars],
            token_ids=list(req.output_token_ids),
            new_text=new_text,
            new_token_ids=new_tokens,
            finished=finished,
            finish_reason=req.finish_reason,
            # copies: the caller may read them on another thread while the engine goes on
            usage=req.usage.snapshot(),
            logprobs=list(req.logprobs) if req.logprobs is not None else None,
            stop_reason=req.stop_reason,
        )
        if finished:
            self._cleanup(req)
        return out

    # ---- pins: prefixes kept whatever else runs (Gemini's cached contents) ----------------------

    def pin(self, pin_id: str, tenant: str | None, token_ids: list[int], ttl_s: float) -> int:
        """Hold the cached full blocks of ``token_ids`` (computed already: pre-warm them first) in
        memory, never evicted, until ``unpin(pin_id)`` or ``ttl_s`` from now. Returns the tokens
        pinned (the leading run of those blocks still cached). Pinning an id again replaces it."""
        if not pin_id.startswith(PIN_PREFIX):
            raise ValueError(f"pin ids start with {PIN_PREFIX!r}")
        self.unpin(pin_id)
        hashes = hash_blocks(self.namespace.root(tenant), token_ids, self.block_size, seed=self.config.cache.hash_seed)
        hit = self.kv.match(pin_id, hashes, len(token_ids) + 1)  # every full block (no token must run)
        held = {b.block_id for p in self._pins for b in self.kv.tables[p].blocks}
        new = sum(1 for b in hit.blocks if b.block_id not in held)
        if len(held) + new > self.kv.pool.num_blocks * 3 // 4:  # requests always keep a quarter to run in
            raise ValueError(f"pinning {new} more blocks would hold {len(held) + new} of the cache's "
                             f"{self.kv.pool.num_blocks} (at most three quarters may be pinned)")
        self.kv.allocate(pin_id, hit.num_tokens, hit)
        self._pins[pin_id] = self._clock() + ttl_s
        self._num_pinned = self._pinned_blocks()
        return hit.num_tokens

    def _pinned_blocks(self) -> int:
        return len({b.block_id for p in self._pins for b in self.kv.tables[p].blocks})

    def repin(self, pin_id: str, ttl_s: float) -> bool:
        """A new lifetime for a pin, from now; False if it is gone."""
        if pin_id not in self._pins:
            return False
        self._pins[pin_id] = self._clock() + ttl_s
        return True

    def unpin(self, pin_id: str) -> bool:
        if self._pins.pop(pin_id, None) is None:
            return False
        self.kv.free(pin_id)  # the blocks stay cached (evictable) as any released blocks
        self._num_pinned = self._pinned_blocks()
        return True

    def expire_pins(self) -> int:
        """Drop the pins whose lifetime ended (called between steps, busy or idle)."""
        now = self._clock()
        gone = [p for p, until in self._pins.items() if until <= now]
        for p in gone:
            self.unpin(p)
        return len(gone)

    # ---- cache control and inspection ----------------------------------------------------------

    def reset_prefix_cache(self) -> int:
        return self.kv.reset_prefix_cache()

    def check_integrity(self) -> None:
        self.kv.check_integrity()

    def info(self) -> EngineInfo:
        return EngineInfo(self.model_name, self.max_model_len, self.block_size, self.kv.pool.num_blocks,
                          self.precision, self.tokenizer, self.runner.loaded.arch.vocab_size,
                          tuple(self.tiers.stack.names) if self.tiers is not None else ())

    def snapshot(self) -> EngineStats:
        c = self.usage.counters
        return EngineStats(self.stats(), dict(c.finished), dict(c.reuse_stops), self.tier_stats(),
                           dict(c.cached_tokens_by_tier))

    def routing_summary(self, max_hashes: int = 4096, prefix_bytes: int = 8) -> dict[str, Any]:
        """What a cluster router needs (cluster/): tokens of work queued and running (prompt tokens
        still to compute plus tokens still to generate), and the hashes (first ``prefix_bytes``) of
        the ``max_hashes`` most recently used cached blocks."""
        load = 0
        for req in (*self.scheduler.waiting, *self.scheduler.running):
            load += max(0, req.num_prompt_tokens - req.num_computed_tokens)
            load += max(0, req.params.max_tokens - len(req.output_token_ids))
        recent = heapq.nlargest(max_hashes, self.kv.index.entries(), key=lambda e: e[1].last_used)
        return {"load_tokens": load, "held": [h[:prefix_bytes] for h, _ in recent]}

    def tier_stats(self) -> dict[str, dict[str, Any]]:
        """Per lower tier: hits, misses, bytes read and written, load time, errors, corrupt objects
        discarded, queued bytes, sizes (cache/tiers.py ``TierCounters``)."""
        return self.tiers.stats() if self.tiers is not None else {}

    def set_wakeup(self, wake: Callable[[], None]) -> None:
        """``wake()`` is called from another thread when work appears that no request brought in
        (a load from a lower tier finished)."""
        if self.tiers is not None:
            self.tiers.on_ready = wake

    def close(self) -> None:
        """Finish queued tier writes and stop their threads (nothing else holds resources)."""
        if self.tiers is not None:
            self.tiers.flush(10.0)
            self.tiers.close()

    def stats(self) -> dict[str, int]:
        c = self.usage.counters
        return {
            "requests_added": c.requests_added,
            "requests_running": len(self.scheduler.running),
            "requests_waiting": len(self.scheduler.waiting),
            "prompt_tokens": c.prompt_tokens,
            "cached_tokens": c.cached_tokens,
            "computed_tokens": c.computed_tokens,
            "generated_tokens": c.generated_tokens,
            "cache_write_tokens": c.cache_write_tokens,
            "preemptions": self.scheduler.num_preemptions,
            "blocks_pinned": self._pinned_blocks(),
            **self.kv.stats(),
        }
