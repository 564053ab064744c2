"""OpenAI response objects and SSE streams built from engine outputs."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from promptcache.engine.request import RequestOutput, TokenLogprob, Usage
from promptcache.server.errors import ApiError, openai_error_body
from promptcache.server.generation import Generation
from promptcache.tokenizer import Tokenizer


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


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
    }


def finish_reason(out: RequestOutput) -> str:
    return "length" if out.finish_reason == "length" else "stop"


def _token_text(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tok: Tokenizer, lps: list[TokenLogprob]) -> list[dict[str, Any]]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tok, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, p) for t, p in lp.top]}
            for lp in lps]


def completion_logprobs(tok: Tokenizer, lps: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    tokens = [_token_text(tok, lp.token_id) for lp in lps]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{_token_text(tok, t): p for t, p in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def chat_response(rid: str, model: str, created: int, out: RequestOutput, tok: Tokenizer,
                  logprobs: bool) -> dict[str, Any]:
    lp = {"content": chat_logprobs(tok, out.logprobs or [])} if logprobs else None
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "system_fingerprint": None,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": out.text, "refusal": None},
            "logprobs": lp,
            "finish_reason": finish_reason(out),
        }],
        "usage": usage_dict(out.usage),
    }


def completion_response(rid: str, model: str, created: int, out: RequestOutput, tok: Tokenizer,
                        logprobs: bool) -> dict[str, Any]:
    lp = completion_logprobs(tok, out.logprobs or []) if logprobs else None
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "text": out.text, "logprobs": lp, "finish_reason": finish_reason(out)}],
        "usage": usage_dict(out.usage),
    }


async def chat_stream(gen: Generation, tok: Tokenizer, rid: str, model: str, created: int,
                      include_usage: bool, logprobs: bool) -> AsyncGenerator[str, None]:
    """``chat.completion.chunk`` events; with ``include_usage`` every chunk carries ``usage: null``
    and one last chunk (``choices: []``) carries the usage, before ``data: [DONE]``."""

    def chunk(delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> str:
        body: dict[str, Any] = {
            "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}],
        }
        if include_usage:
            body["usage"] = None
        return sse(body)

    try:
        yield chunk({"role": "assistant", "content": ""})
        out, num_sent_logprobs = gen.first, 0
        while True:
            lp = None
            if logprobs and out.logprobs is not None and len(out.logprobs) > num_sent_logprobs:
                lp = {"content": chat_logprobs(tok, out.logprobs[num_sent_logprobs:])}
                num_sent_logprobs = len(out.logprobs)
            if out.new_text or lp is not None:
                yield chunk({"content": out.new_text}, lp=lp)
            if out.finished:
                break
            out = await gen.next()
        yield chunk({}, finish=finish_reason(out))
        if include_usage:
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "system_fingerprint": None, "choices": [], "usage": usage_dict(out.usage)})
        yield "data: [DONE]\n\n"
    except ApiError as e:  # the engine failed mid-stream: the status is already 200, say it in-band
        yield sse(openai_error_body(e.status, e.message))
    finally:
        await gen.close()


async def completion_stream(gen: Generation, tok: Tokenizer, rid: str, model: str, created: int,
                            include_usage: bool, logprobs: bool) -> AsyncGenerator[str, None]:
    def chunk(text: str, finish: str | None = None, lp: Any = None) -> str:
        body: dict[str, Any] = {
            "id": rid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}],
        }
        if include_usage:
            body["usage"] = None
        return sse(body)

    try:
        out, num_sent_logprobs, num_sent_chars = gen.first, 0, 0
        while True:
            lp = None
            if logprobs and out.logprobs is not None and len(out.logprobs) > num_sent_logprobs:
                lp = completion_logprobs(tok, out.logprobs[num_sent_logprobs:], num_sent_chars)
                num_sent_logprobs = len(out.logprobs)
            finish = finish_reason(out) if out.finished else None
            if out.new_text or lp is not None or finish:
                yield chunk(out.new_text, finish, lp)
            num_sent_chars += len(out.new_text)
            if out.finished:
                break
            out = await gen.next()
        if include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                       "system_fingerprint": None, "choices": [], "usage": usage_dict(out.usage)})
        yield "data: [DONE]\n\n"
    except ApiError as e:
        yield sse(openai_error_body(e.status, e.message))
    finally:
        await gen.close()
