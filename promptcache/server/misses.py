"""Per-request miss explanations, shared by both dialects (the logic is in ``diagnosis.py``).

- ``x-promptcache-diagnose: true`` (request header): the response carries ``promptcache_diagnosis``
  against the named earlier request, or else the closest earlier request of the same tenant.
- OpenAI ``prompt_cache_options.comparison_response_id`` -> ``prompt_cache_diagnostics``;
  Anthropic ``diagnostics.previous_message_id`` -> ``diagnostics`` (the providers' fields).
- ``x-promptcache-history: off``: this request's prompt is not kept (it cannot be compared with
  later); ``--diagnosis-history 0`` keeps nothing for anyone.

Every request also gets one log line (logger ``promptcache.requests``): tenant, prompt / cached /
computed tokens, where reuse ended and the engine's reason, time to first token.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from promptcache.engine.api import RequestOutput
from promptcache.server.activity import OPEN_TENANT, RequestEvent
from promptcache.server.diagnosis import Diagnosis, Part, PromptRecord, diagnose, lint
from promptcache.server.state import ServerState

DIAGNOSE_HEADER = "x-promptcache-diagnose"
HISTORY_HEADER = "x-promptcache-history"
request_log = logging.getLogger("promptcache.requests")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def wants_diagnosis(request: Request) -> bool:
    return _truthy(request.headers.get(DIAGNOSE_HEADER))


def explain(state: ServerState, request: Request, tenant: str | None, rid: str, parts: Sequence[Part],
            token_ids: Sequence[int], first: RequestOutput, named: str | None, ours: bool) -> Diagnosis | None:
    """Diagnose (when asked) and remember this request's prompt (unless it opted out). Runs in a
    worker thread: finding the closest earlier prompt compares token ids."""
    model = state.model_names[0]  # the served model: aliases of it share one cache
    diag = None
    asked = named is not None or ours
    computed = first.usage.prompt_tokens - first.usage.cached_tokens
    keep = request.headers.get(HISTORY_HEADER, "").strip().lower() != "off"  # off: nothing of it is kept
    if asked or (keep and state.history.enabled and state.activity.should_diagnose(computed, state.block_size)):
        prev = state.history.get(tenant, named) if named is not None else state.history.closest(tenant, token_ids, rid)
        diag = diagnose(prev, parts, model, token_ids, first.usage, state.block_size, named)
        if asked:  # lint counts the divergences clients are told about
            lint(state.history, tenant, diag)
        if keep and not _new_question(prev, diag):
            state.activity.note_diagnosis(tenant, rid, diag.as_dict())
    if state.history.enabled and keep:
        state.history.add(tenant, PromptRecord(rid, model, tuple(parts), array("i", token_ids)))
    return diag


def _new_question(prev: PromptRecord | None, diag: Diagnosis) -> bool:
    """Only the earlier prompt's last part differs (the same system prompt and history, another
    question): the expected case of a conversation, not reuse the dashboard should call lost."""
    d = diag.divergence
    return (diag.reason == "diverged" and d is not None and prev is not None and bool(prev.parts)
            and d["path"] == prev.parts[-1].path)


async def response_fields(state: ServerState, request: Request, tenant: str | None, rid: str,
                          parts: Callable[[], list[Part]], token_ids: Sequence[int], first: RequestOutput,
                          named: str | None, provider_field: str,
                          provider: Callable[[Diagnosis], dict[str, Any] | None]) -> dict[str, Any]:
    """The response's diagnosis fields: the provider's (``provider_field``, for a ``named`` request)
    and ``promptcache_diagnosis`` (header). Parts are built and compared in a worker thread: their
    size is the body's."""
    ours = wants_diagnosis(request)

    def work() -> Diagnosis | None:
        return explain(state, request, tenant, rid, parts(), token_ids, first, named, ours)

    diag = await run_in_threadpool(work)
    fields: dict[str, Any] = {}
    if diag is not None and named is not None:
        fields[provider_field] = provider(diag)
    if diag is not None and ours:
        fields["promptcache_diagnosis"] = diag.as_dict()
    return fields


def remember_output(state: ServerState, tenant: str | None, out: RequestOutput) -> None:
    """A finished request's generated tokens that ran (all but the last) are cached K/V too: a
    follow-up turn that repeats them can reuse them."""
    if len(out.token_ids) > 1:
        state.history.extend(tenant, out.request_id, out.token_ids[:-1])


def log_request(tenant: str | None, endpoint: str, out: RequestOutput, ttft_s: float) -> None:
    u = out.usage
    stop = u.reuse_stop
    why = stop.reason if stop is not None else "-"
    if stop is not None and stop.idle_s is not None:
        why += f" (idle {stop.idle_s:.0f} s, {stop.ago_s or 0:.0f} s ago)"
    request_log.info("%s tenant=%s id=%s prompt=%d cached=%d computed=%d reuse_ended_at=%d why=%s ttft_ms=%.0f",
                     endpoint, tenant or "-", out.request_id, u.prompt_tokens, u.cached_tokens,
                     u.prompt_tokens - u.cached_tokens, u.cached_tokens, why, ttft_s * 1000)


def on_finish(state: ServerState, tenant: str | None, endpoint: str, ttft_s: float) -> Callable[[RequestOutput], None]:
    """What happens when a request finishes, whatever its dialect: its output joins its history
    record, its cost is counted, and its log line is written."""
    def done(out: RequestOutput) -> None:
        remember_output(state, tenant, out)
        cost = state.prices.cost(state.model_names[0], out.usage)
        state.metrics.observe_finish(tenant, out.usage.prompt_tokens, out.usage.cached_tokens, cost.total,
                                     cost.without_cache)
        log_request(tenant, endpoint, out, ttft_s)
        u = out.usage
        state.activity.record(RequestEvent(
            t=time.time(), id=out.request_id, tenant=tenant or OPEN_TENANT, endpoint=endpoint,
            prompt=u.prompt_tokens, cached=u.cached_tokens, generated=u.completion_tokens,
            ttft_ms=round(ttft_s * 1000, 1), reason=u.reuse_stop.reason if u.reuse_stop is not None else "-",
            cost_usd=cost.total, saved_usd=cost.saved, by_tier=dict(u.cached_tokens_by_tier)))

    return done


def cost_field(state: ServerState, out: RequestOutput) -> dict[str, Any]:
    return {"promptcache_cost": state.prices.cost(state.model_names[0], out.usage).as_dict()}
