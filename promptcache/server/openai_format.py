"""OpenAI response objects and SSE streams built from engine outputs.

``created`` is the time each response (or stream) was made. Logprob ``bytes`` are the token's own
bytes: with a byte-level BPE vocabulary (GPT-2, Llama 3, Qwen) a token holding part of a UTF-8
character gives those raw bytes, so a client can join them back into the text. Other vocabularies
(SentencePiece) give the UTF-8 of the token's decoded text, except byte-fallback tokens (``<0xE3>``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from promptcache.engine.api import RequestOutput, TokenLogprob, Usage
from promptcache.server.choices import summed
from promptcache.server.errors import ApiError, error_json, openai_error_body
from promptcache.server.generation import Generation, guarded_events
from promptcache.server.tools import ToolCall, ToolPlan
from promptcache.tokenizer import Tokenizer

log = logging.getLogger(__name__)
DONE = "data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def tier_split(u: Usage) -> dict[str, Any]:
    """The extension field both dialects add to usage when cached tokens came from below memory:
    ``{"promptcache_cached_tokens_by_tier": {"memory": m, "disk": d, "redis": r}}`` (they sum to
    the cached tokens); absent otherwise."""
    if not u.cached_tokens_by_tier:
        return {}
    split = {"memory": u.cached_tokens - sum(u.cached_tokens_by_tier.values()), **u.cached_tokens_by_tier}
    return {"promptcache_cached_tokens_by_tier": split}


def usage_dict(u: Usage) -> dict[str, Any]:
    """``cached_tokens`` and ``cache_write_tokens`` are always present (0 when nothing happened)."""
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {
            "cached_tokens": u.cached_tokens,
            "cache_write_tokens": u.cache_write_tokens,
        },
        "completion_tokens_details": {"reasoning_tokens": 0},
        **tier_split(u),
    }


def finish_reason(out: RequestOutput) -> str:
    return "length" if out.finish_reason == "length" else "stop"


# ---- logprobs ------------------------------------------------------------------------------------


def _byte_decoder() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` table, inverted: the character a byte-level vocabulary uses for
    each byte (printable bytes stand for themselves, the others are shifted past U+0100)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


_BYTE_DECODER = _byte_decoder()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tok: Tokenizer, token_id: int, text: str) -> list[int]:
    """The bytes ``token_id`` stands for (``text`` is its decoded text). A vocabulary entry is read
    as raw bytes only if they decode to ``text``; otherwise (not byte-level) ``text`` is encoded."""
    raw = tok.convert_ids_to_tokens([token_id])[0]
    fallback = _BYTE_FALLBACK.fullmatch(raw)
    if fallback is not None:
        data = bytes([int(fallback.group(1), 16)])
    elif raw and all(c in _BYTE_DECODER for c in raw):
        data = bytes(_BYTE_DECODER[c] for c in raw)
    else:
        data = text.encode("utf-8")
    if data.decode("utf-8", "replace") != text:
        data = text.encode("utf-8")
    return list(data)


def _token_text(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tok: Tokenizer, lps: list[TokenLogprob]) -> list[dict[str, Any]]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tok, token_id)
        return {"token": text, "logprob": logprob, "bytes": token_bytes(tok, token_id, text)}

    return [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, p) for t, p in lp.top]}
            for lp in lps]


def completion_logprobs(tok: Tokenizer, lps: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """Legacy shape. ``top_logprobs`` maps text to logprob, so two tokens that decode to the same
    text (e.g. both halves of a split character, U+FFFD) share one key: the more likely one wins."""
    tokens = [_token_text(tok, lp.token_id) for lp in lps]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    tops = []
    for lp in lps:
        top: dict[str, float] = {}
        for token_id, logprob in lp.top:  # most likely first
            top.setdefault(_token_text(tok, token_id), logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps], "top_logprobs": tops,
            "text_offset": offsets}


# ---- whole responses -----------------------------------------------------------------------------


def _head(rid: str, obj: str, model: str, created: int) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": None}


def tool_calls_json(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
            for c in calls]


def chat_response(rid: str, model: str, out: RequestOutput, tok: Tokenizer, logprobs: bool,
                  tools: ToolPlan | None = None) -> dict[str, Any]:
    lp = {"content": chat_logprobs(tok, out.logprobs or [])} if logprobs else None
    content, calls = tools.split(out.text) if tools is not None else (out.text, [])
    message: dict[str, Any] = {"role": "assistant", "content": content if (content or not calls) else None,
                               "refusal": None}
    finish = finish_reason(out)
    if calls:
        message["tool_calls"] = tool_calls_json(calls)
        finish = "tool_calls"
    return {**_head(rid, "chat.completion", model, int(time.time())),
            "choices": [{"index": 0, "message": message, "logprobs": lp, "finish_reason": finish}],
            "usage": usage_dict(out.usage)}


def completion_response(rid: str, model: str, out: RequestOutput, tok: Tokenizer,
                        logprobs: bool) -> dict[str, Any]:
    lp = completion_logprobs(tok, out.logprobs or []) if logprobs else None
    return {**_head(rid, "text_completion", model, int(time.time())),
            "choices": [{"index": 0, "text": out.text, "logprobs": lp, "finish_reason": finish_reason(out)}],
            "usage": usage_dict(out.usage)}


# ---- streams -------------------------------------------------------------------------------------


async def _steps(gen: Generation, logprobs: bool) -> AsyncGenerator[tuple[RequestOutput, list[TokenLogprob]], None]:
    """Each output with the logprobs it added (none without ``logprobs``); the last one is finished."""
    out, num_sent_logprobs = gen.first, 0
    while True:
        new = out.logprobs[num_sent_logprobs:] if logprobs and out.logprobs is not None else []
        num_sent_logprobs += len(new)
        yield out, new
        if out.finished:
            return
        out = await gen.next()


class _Chunks:
    """One stream's chunks: the same id, object and ``created`` on each. With ``include_usage``
    every chunk carries ``usage: null`` and one last chunk (``choices: []``) carries the usage."""

    def __init__(self, rid: str, obj: str, model: str, include_usage: bool, first_extra: dict[str, Any] | None = None,
                 usage_extra: Callable[[RequestOutput], dict[str, Any]] | None = None) -> None:
        self.head = _head(rid, obj, model, int(time.time()))
        self.include_usage = include_usage
        self.first_extra = first_extra or {}  # extension fields on the first chunk (diagnoses)
        self.usage_extra = usage_extra  # ... and on the usage chunk (cost)

    def choice(self, index: int = 0, **choice: Any) -> str:
        body: dict[str, Any] = {**self.head, "choices": [{"index": index, **choice}]}
        if self.include_usage:
            body["usage"] = None
        body.update(self.first_extra)
        self.first_extra = {}
        return sse(body)

    def usage(self, out: RequestOutput) -> str:
        extra = self.usage_extra(out) if self.usage_extra is not None else {}
        return sse({**self.head, "choices": [], "usage": usage_dict(out.usage), **extra})


def before_marker(text: str, marker: str) -> int:
    """How much of ``text`` cannot be part of a tool call: all before the marker, or before a tail
    that could still grow into it."""
    at = text.find(marker)
    if at >= 0:
        return at
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return len(text) - k
    return len(text)


def _error_event(e: ApiError) -> str:
    return f"data: {error_json(openai_error_body(e.status, e.message))}\n\n"


def chat_stream(gens: Generation | list[Generation], tok: Tokenizer, rid: str, model: str, include_usage: bool,
                logprobs: bool, first_extra: dict[str, Any] | None = None,
                usage_extra: Callable[[RequestOutput], dict[str, Any]] | None = None,
                tools: ToolPlan | None = None, token_ids: bool = False) -> AsyncGenerator[str, None]:
    """``chat.completion.chunk`` events: the role, content deltas, the finish reason, usage, [DONE].

    ``n`` generations (choices) stream interleaved, each chunk naming its choice's index; the usage
    chunk comes once, after every choice finished (the prompt once, completions summed). With
    tools, text from the first place a tool call could begin is held back; at the end it is either
    tool-call deltas (one per call: id, name and the whole arguments) or content after all.
    Every generated token is a chunk (its content may be "": an incomplete UTF-8 sequence, a token
    that decodes to nothing), so a client sees the first token when it is made; ``token_ids``
    (``return_token_ids``) adds each chunk's ids."""
    group = gens if isinstance(gens, list) else [gens]
    chunks = _Chunks(rid, "chat.completion.chunk", model, include_usage, first_extra, usage_extra)
    marker = tools.format.start if tools is not None and tools.parse else None

    def choice_events(i: int, out: RequestOutput, new_logprobs: list[TokenLogprob], sent: list[int]) -> list[str]:
        events = []
        lp = {"content": chat_logprobs(tok, new_logprobs)} if new_logprobs else None
        safe = len(out.text) if marker is None else before_marker(out.text, marker)
        if out.finished and marker is not None:
            _, calls = tools.split(out.text) if tools is not None else (out.text, [])
            if calls:
                for k, call in enumerate(tool_calls_json(calls)):
                    events.append(chunks.choice(i, delta={"tool_calls": [{"index": k, **call}]}, logprobs=None,
                                                finish_reason=None))
                return [*events, chunks.choice(i, delta={}, logprobs=None, finish_reason="tool_calls")]
            safe = len(out.text)
        ids: dict[str, Any] = {"token_ids": list(out.new_token_ids)} if token_ids else {}
        if safe > sent[i] or lp is not None or (out.new_token_ids and marker is None):
            events.append(chunks.choice(i, delta={"content": out.text[sent[i]:safe]}, logprobs=lp,
                                        finish_reason=None, **ids))
            sent[i] = max(sent[i], safe)
        elif ids and out.new_token_ids:  # text held back for a possible tool call: the ids still go
            events.append(chunks.choice(i, delta={}, logprobs=None, finish_reason=None, **ids))
        if out.finished:
            events.append(chunks.choice(i, delta={}, logprobs=None, finish_reason=finish_reason(out)))
        return events

    async def events() -> AsyncGenerator[str, None]:
        for i in range(len(group)):
            yield chunks.choice(i, delta={"role": "assistant", "content": ""}, logprobs=None, finish_reason=None)
        sent = [0] * len(group)  # characters of each choice's text sent as content
        finals: dict[int, RequestOutput] = {}
        async with contextlib.aclosing(_merged(group, logprobs)) as merged:  # pumps stop before closing
            async for i, out, new_logprobs in merged:
                for event in choice_events(i, out, new_logprobs, sent):
                    yield event
                if out.finished:
                    finals[i] = out
        if include_usage:
            yield chunks.usage(summed([finals[i] for i in sorted(finals)]))
        yield DONE

    return guarded_events(_Group(group), events(), _error_event)


class _Group:
    """Several generations closed as one (guarded_events closes what it is given)."""

    def __init__(self, gens: list[Generation]) -> None:
        self.gens = gens
        self.first = gens[0].first

    async def close(self) -> None:
        for g in self.gens:  # every one, even if one fails: each holds KV blocks
            try:
                await g.close()
            except Exception:
                log.exception("closing choice %s failed", g.first.request_id)


async def _merged(gens: list[Generation], logprobs: bool,
                  ) -> AsyncGenerator[tuple[int, RequestOutput, list[TokenLogprob]], None]:
    """Every generation's outputs as they come, tagged with its index (one generation: in order)."""
    if len(gens) == 1:
        async for out, lp in _steps(gens[0], logprobs):
            yield 0, out, lp
        return
    import asyncio

    # bounded: the pumps read ahead of a slow client by a few outputs per choice, not without limit
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None, list[TokenLogprob]]] = \
        asyncio.Queue(maxsize=4 * len(gens))

    async def pump(i: int, gen: Generation) -> None:
        try:
            async for out, lp in _steps(gen, logprobs):
                await queue.put((i, out, lp))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # handed to the consumer, which raises it
            await queue.put((i, e, []))
            return
        await queue.put((i, None, []))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            i, item, lp = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item, lp
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # no pump still reads a stream being closed


def completion_stream(gen: Generation, tok: Tokenizer, rid: str, model: str, include_usage: bool,
                      logprobs: bool, first_extra: dict[str, Any] | None = None,
                      usage_extra: Callable[[RequestOutput], dict[str, Any]] | None = None,
                      token_ids: bool = False) -> AsyncGenerator[str, None]:
    """``text_completion`` events: one per generated token (its text may be ""; the last one has
    the finish reason; ``token_ids`` adds its ids), usage, [DONE]."""
    chunks = _Chunks(rid, "text_completion", model, include_usage, first_extra, usage_extra)

    async def events() -> AsyncGenerator[str, None]:
        num_sent_chars = 0
        async for out, new_logprobs in _steps(gen, logprobs):
            lp = completion_logprobs(tok, new_logprobs, num_sent_chars) if new_logprobs else None
            finish = finish_reason(out) if out.finished else None
            if out.new_token_ids or out.new_text or lp is not None or finish:
                ids: dict[str, Any] = {"token_ids": list(out.new_token_ids)} if token_ids else {}
                yield chunks.choice(0, text=out.new_text, logprobs=lp, finish_reason=finish, **ids)
            num_sent_chars += len(out.new_text)
            if out.finished and include_usage:
                yield chunks.usage(out)
        yield DONE

    return guarded_events(gen, events(), _error_event)
