"""OpenAI dialect through the official SDK: exact cached_tokens, streaming usage, completions."""

from __future__ import annotations

import time
from typing import Any

import pytest
from openai import OpenAI
from test_server_harness import MODEL, Server, nonce, text_of_tokens

from promptcache.engine.request import TokenLogprob
from promptcache.sequences import common_prefix_len
from promptcache.server import openai_format as fmt

BLOCK = 16


@pytest.fixture(scope="module")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _chat(system: str, question: str) -> list[Any]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def _usage(u: Any) -> tuple[int, int, int, int]:
    d = u.prompt_tokens_details
    return u.prompt_tokens, d.cached_tokens, d.cache_write_tokens, u.completion_tokens


def test_shared_system_prompt_is_reused_exactly(server: Server, client: OpenAI) -> None:
    tok = server.engine.tokenizer
    system = text_of_tokens(tok, 1500, nonce())
    first, second = _chat(system, "What is the first word?"), _chat(system, "Summarise it in one line.")
    ids1, ids2 = tok.apply_chat_template(first), tok.apply_chat_template(second)
    system_end = len(tok.apply_chat_template(first[:1], add_generation_prompt=False))
    assert system_end >= 1500

    usages, texts = [], []
    for stream in (False, True):
        if stream:  # the same pair again, streamed, on an empty cache: the same usage
            server.aengine.call(lambda e: e.reset_prefix_cache())
        for messages in (first, second):
            usage, text = _create(client, messages, stream)
            usages.append(_usage(usage))
            texts.append(text)

    r1, r2 = usages[0], usages[1]
    assert r1 == (len(ids1), 0, len(ids1) // BLOCK * BLOCK, 4)
    reused = common_prefix_len(ids1, ids2) // BLOCK * BLOCK  # block-aligned, through the whole system prompt
    assert reused >= system_end // BLOCK * BLOCK
    assert r2[:3] == (len(ids2), reused, len(ids2) // BLOCK * BLOCK - reused)
    assert usages[2:] == usages[:2]
    assert texts[2:] == texts[:2]  # greedy: the streamed text is the same text
    server.check_integrity()
    assert server.stats()["blocks_in_use"] == 0


def _create(client: OpenAI, messages: list[Any], stream: bool) -> tuple[Any, str]:
    if not stream:
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length"
        return r.usage, r.choices[0].message.content or ""
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last = chunks
    assert all(c.usage is None for c in body)  # only the extra last chunk carries usage
    assert last.choices == [] and last.usage is not None
    assert body[-1].choices[0].finish_reason == "length"
    return last.usage, "".join(c.choices[0].delta.content or "" for c in body)


def test_cached_tokens_always_present(server: Server, client: OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": nonce()}],
                                       max_tokens=1)
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert r.usage.prompt_tokens_details.cache_write_tokens == r.usage.prompt_tokens // BLOCK * BLOCK


def test_content_parts_roles_and_prompt_cache_fields(server: Server, client: OpenAI) -> None:
    server.aengine.call(lambda e: e.reset_prefix_cache())  # no 1h block of an earlier test is counted
    tok = server.engine.tokenizer
    head = text_of_tokens(tok, 200, nonce())
    messages: list[Any] = [
        {"role": "developer", "content": [
            {"type": "text", "text": head, "prompt_cache_breakpoint": {"mode": "explicit"}},
            {"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}]},
    ]
    extra = {"prompt_cache_options": {"mode": "explicit", "ttl": "1h"}}
    r1 = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, prompt_cache_key="k1",
                                        prompt_cache_retention="24h", extra_body=extra)
    expected = tok.apply_chat_template([{"role": "system", "content": head + "\nAnswer briefly."},
                                        {"role": "user", "content": "Hello"},
                                        {"role": "assistant", "content": "Hi."},
                                        {"role": "tool", "content": "42"},
                                        {"role": "user", "content": "And now?"}])
    assert r1.usage is not None and r1.usage.prompt_tokens == len(expected)
    # the explicit breakpoint pins [0, breakpoint) for an hour; everything after it is plain LRU
    pinned = server.aengine.call(lambda e: sum(1 for b in e.kv.pool.blocks if b.ttl_s == 3600.0))
    head_ids = tok.encode(f"<|im_start|>system\n{head}", add_special_tokens=False)
    breakpoint_at = common_prefix_len(head_ids, expected)
    assert pinned == breakpoint_at // BLOCK > 0
    messages[-1] = {"role": "user", "content": "Different question."}
    r2 = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, extra_body=extra)
    assert r2.usage is not None and r2.usage.prompt_tokens_details is not None
    assert r2.usage.prompt_tokens_details.cached_tokens >= pinned * BLOCK


def test_prewarm_generates_nothing_and_fills_the_cache(client: OpenAI, server: Server) -> None:
    messages = _chat(text_of_tokens(server.engine.tokenizer, 300, nonce()), "Q?")
    r = client.chat.completions.create(model=MODEL, messages=messages,
                                       extra_body={"prompt_cache_options": {"prewarm": True}})
    assert r.choices[0].message.content == "" and r.usage is not None
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens_details is not None
    written = r.usage.prompt_tokens_details.cache_write_tokens
    assert written == r.usage.prompt_tokens // BLOCK * BLOCK
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    # the last prompt token always runs (its logits are needed), so a whole-prompt hit stops a block short
    assert again.usage.prompt_tokens_details.cached_tokens == (r.usage.prompt_tokens - 1) // BLOCK * BLOCK


def test_completions_stop_seed_and_logprobs(server: Server, client: OpenAI) -> None:
    prompt = text_of_tokens(server.engine.tokenizer, 40, nonce())
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True}, logprobs=3)
    choice = full.choices[0]
    assert choice.finish_reason == "length" and full.usage is not None
    assert full.usage.prompt_tokens == len(server.engine.tokenizer.encode(prompt))
    assert choice.logprobs is not None and len(choice.logprobs.token_logprobs or []) == 8
    assert all(len(top) <= 3 for top in choice.logprobs.top_logprobs or [])
    assert "".join(choice.logprobs.tokens or []) == choice.text
    # a stop string cuts the text where it starts, as OpenAI does
    stop = choice.text[3:6]
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == choice.text[: choice.text.find(stop)]
    # token-id prompts are accepted; seeded sampling repeats itself
    ids = server.engine.tokenizer.encode(prompt)
    a, b = (client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=1.0, seed=7)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                              stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}))
    *body, last = streamed
    assert all(c.usage is None for c in body) and last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 8
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    assert "".join(c.choices[0].text for c in body) == choice.text
    assert body[-1].choices[0].finish_reason == "length"
    assert len({c.created for c in streamed}) == 1 and len({c.id for c in streamed}) == 1


def test_chat_logprobs(client: OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=3, logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content if r.choices[0].logprobs else None
    assert content is not None and len(content) == 3
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.bytes is not None and bytes(entry.bytes).decode("utf-8", "replace") == entry.token


def test_logprob_bytes_are_the_tokens_own_bytes(server: Server) -> None:
    """Byte-level BPE splits characters across tokens; each token's bytes are its part, so joined
    they give back the UTF-8 of the text (the decoded text of such a token is only U+FFFD)."""
    tok = server.engine.tokenizer
    text = "日本語 ✓ é naïve"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [fmt.token_bytes(tok, i, tok.decode([i], skip_special_tokens=False)) for i in ids]
    assert any(bytes(p).decode("utf-8", "replace") == "\ufffd" for p in pieces)  # split characters exist
    assert b"".join(bytes(p) for p in pieces) == text.encode()


def test_completion_top_logprobs_keep_the_likeliest_of_equal_texts(server: Server) -> None:
    tok = server.engine.tokenizer
    split = [i for i in tok.encode("日本語", add_special_tokens=False)
             if tok.decode([i], skip_special_tokens=False) == "\ufffd"][:2]  # two tokens, one text
    top = fmt.completion_logprobs(tok, [TokenLogprob(split[0], -0.5, ((split[0], -0.5), (split[1], -1.5)))])
    assert top["top_logprobs"] == [{"\ufffd": -0.5}]


def test_chat_stop_max_completion_tokens_top_p_and_created(server: Server, client: OpenAI) -> None:
    messages: Any = [{"role": "user", "content": text_of_tokens(server.engine.tokenizer, 30, nonce())}]
    asked_at = int(time.time())
    greedy = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10,
                                            max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    text = greedy.choices[0].message.content or ""
    assert greedy.usage is not None and greedy.usage.completion_tokens == 10  # max_completion_tokens wins
    assert greedy.choices[0].finish_reason == "length" and len(text) >= 8
    assert asked_at <= greedy.created <= time.time()  # this response's time, not the server's start
    # a tiny top_p keeps only the most likely token: the greedy answer at temperature 1
    nucleus = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10,
                                             temperature=1.0, top_p=1e-6, extra_body={"ignore_eos": True})
    assert nucleus.choices[0].message.content == text
    stop = text[4:8]
    cut = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0,
                                         stop=stop, extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.find(stop)]


@pytest.mark.parametrize("fields, ttl_s", [
    ({"prompt_cache_retention": "in_memory"}, 600.0),
    ({"prompt_cache_retention": "24h"}, 86400.0),
    ({"prompt_cache_options": {"ttl": "45m"}}, 2700.0),
    ({}, 0.0),  # no opt-in: cached, but only as long as LRU eviction allows
])
def test_retention_fields_pin_the_prompt(server: Server, client: OpenAI, fields: dict[str, Any],
                                         ttl_s: float) -> None:
    def pinned() -> dict[float, int]:
        ttls = server.aengine.call(lambda e: [b.ttl_s for b in e.kv.pool.blocks if b.block_hash is not None])
        return {t: ttls.count(t) for t in set(ttls) if t > 0}

    before = pinned()
    prompt = text_of_tokens(server.engine.tokenizer, 100, nonce())
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body=fields)
    assert r.usage is not None
    after = pinned()
    if ttl_s:
        assert after.pop(ttl_s) - before.pop(ttl_s, 0) == r.usage.prompt_tokens // BLOCK
    assert after == before
