"""Anthropic dialect through the official SDK: cache_control, usage arithmetic, rules, streaming."""

from __future__ import annotations

from typing import Any

import pytest
from anthropic import Anthropic, BadRequestError
from test_server_harness import MODEL, Server, nonce, text_of_tokens

from promptcache.sequences import common_prefix_len

BLOCK = 16
TTL_ORDER = ("a ttl='1h' cache_control block must not come after a ttl='5m' cache_control block. "
             "Note that blocks are processed in the following order: `tools`, `system`, `messages`.")


@pytest.fixture(scope="module")
def client(server: Server) -> Anthropic:
    return Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def _cc(ttl: str = "5m") -> dict[str, Any]:
    return {"type": "ephemeral", "ttl": ttl}


def _total(u: Any) -> int:
    return int(u.cache_read_input_tokens + u.cache_creation_input_tokens + u.input_tokens)


def _breakpoint_tokens(server: Server, messages: list[dict[str, str]], block_text: str) -> int:
    """Where a breakpoint after ``block_text`` falls, computed independently of the server code."""
    tok = server.engine.tokenizer
    text = tok.render_chat(messages)
    full = tok.encode(text, add_special_tokens=False)
    end = text.index(block_text) + len(block_text)
    return common_prefix_len(tok.encode(text[:end], add_special_tokens=False), full)


def test_system_cache_control_writes_then_reads(server: Server, client: Anthropic) -> None:
    system_text = text_of_tokens(server.engine.tokenizer, 1500, nonce())
    system = [{"type": "text", "text": system_text, "cache_control": _cc()}]
    m1 = client.messages.create(model=MODEL, max_tokens=4, system=system,
                                messages=[{"role": "user", "content": "What is the first word?"}])
    template = [{"role": "system", "content": system_text},
                {"role": "user", "content": "What is the first word?"}]
    bp = _breakpoint_tokens(server, template, system_text)
    total = len(server.engine.tokenizer.apply_chat_template(template))
    u = m1.usage
    assert u.cache_read_input_tokens == 0
    assert u.cache_creation_input_tokens == bp // BLOCK * BLOCK > 1400
    assert u.cache_creation is not None and u.cache_creation.ephemeral_5m_input_tokens == bp // BLOCK * BLOCK
    assert u.cache_creation.ephemeral_1h_input_tokens == 0
    assert _total(u) == total
    assert client.messages.count_tokens(model=MODEL, system=system, messages=[
        {"role": "user", "content": "What is the first word?"}]).input_tokens == total

    m2 = client.messages.create(model=MODEL, max_tokens=4, system=system,
                                messages=[{"role": "user", "content": "Now a different question."}])
    u2 = m2.usage
    assert u2.cache_read_input_tokens is not None and u2.cache_read_input_tokens >= bp // BLOCK * BLOCK
    assert u2.cache_creation_input_tokens == 0  # everything up to the breakpoint was already stored
    assert _total(u2) == u2.cache_read_input_tokens + u2.input_tokens
    server.check_integrity()


def test_ttls_split_creation_and_pin_blocks(server: Server, client: Anthropic) -> None:
    server.aengine.call(lambda e: e.reset_prefix_cache())  # no 1h block of an earlier test is counted
    tok = server.engine.tokenizer
    head, tail = text_of_tokens(tok, 200, nonce()), text_of_tokens(tok, 100, "Details:")
    m = client.messages.create(
        model=MODEL, max_tokens=1,
        system=[{"type": "text", "text": head, "cache_control": _cc("1h")}],
        messages=[{"role": "user", "content": [{"type": "text", "text": tail, "cache_control": _cc("5m")},
                                               {"type": "text", "text": "Question?"}]}])
    template = [{"role": "system", "content": head}, {"role": "user", "content": f"{tail}\nQuestion?"}]
    bp1, bp2 = _breakpoint_tokens(server, template, head), _breakpoint_tokens(server, template, tail)
    c = m.usage.cache_creation
    assert c is not None
    assert c.ephemeral_1h_input_tokens == bp1 // BLOCK * BLOCK
    assert c.ephemeral_5m_input_tokens == bp2 // BLOCK * BLOCK - bp1 // BLOCK * BLOCK
    assert m.usage.cache_creation_input_tokens == bp2 // BLOCK * BLOCK
    assert _total(m.usage) == len(tok.apply_chat_template(template))
    ttls = server.aengine.call(lambda e: [b.ttl_s for b in e.kv.pool.blocks])
    assert ttls.count(3600.0) == bp1 // BLOCK


def test_automatic_cache_control_and_prewarm(server: Server, client: Anthropic) -> None:
    system_text = text_of_tokens(server.engine.tokenizer, 300, nonce())
    messages: Any = [{"role": "user", "content": "Question one?"}]
    warm = client.messages.create(model=MODEL, max_tokens=0, system=system_text, messages=messages,
                                  cache_control=_cc())
    assert warm.content == [] and warm.stop_reason == "max_tokens" and warm.usage.output_tokens == 0
    template = [{"role": "system", "content": system_text}, {"role": "user", "content": "Question one?"}]
    bp = _breakpoint_tokens(server, template, "Question one?")  # the last block of the last message
    assert warm.usage.cache_creation_input_tokens == bp // BLOCK * BLOCK
    assert _total(warm.usage) == len(server.engine.tokenizer.apply_chat_template(template))
    hit = client.messages.create(model=MODEL, max_tokens=2, system=system_text, messages=messages)
    assert hit.usage.cache_read_input_tokens == (_total(hit.usage) - 1) // BLOCK * BLOCK
    assert hit.usage.cache_creation_input_tokens == 0  # no breakpoint: nothing counts as a write


def test_streaming_events_and_usage(server: Server, client: Anthropic) -> None:
    # a fixed prompt (no nonce), greedy, past EOS: the same non-empty text on every run
    system = [{"type": "text", "text": text_of_tokens(server.engine.tokenizer, 200, "Streaming test."),
               "cache_control": _cc()}]
    messages: Any = [{"role": "user", "content": "Tell me."}]
    # the current SDK has no temperature argument (older clients send it); ignore_eos is an extension
    greedy = {"temperature": 0, "ignore_eos": True}
    server.aengine.call(lambda e: e.reset_prefix_cache())
    plain = client.messages.create(model=MODEL, max_tokens=5, system=system, messages=messages,
                                   extra_body=greedy)
    assert plain.content and plain.stop_reason == "max_tokens" and plain.usage.output_tokens == 5
    server.aengine.call(lambda e: e.reset_prefix_cache())
    with client.messages.stream(model=MODEL, max_tokens=5, system=system, messages=messages,
                                extra_body=greedy) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    raw = [e for e in events if e != "text"]
    assert raw[:3] == ["message_start", "content_block_start", "content_block_delta"]
    assert raw[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert [b.text for b in final.content] == [b.text for b in plain.content]  # type: ignore[union-attr]
    assert final.stop_reason == plain.stop_reason
    assert final.usage.model_dump() == plain.usage.model_dump()


def _error(client: Anthropic, **kwargs: Any) -> dict[str, Any]:
    with pytest.raises(BadRequestError) as info:
        client.messages.create(model=MODEL, max_tokens=1, **kwargs)
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    return body["error"]


def test_five_breakpoints_is_a_400(client: Anthropic) -> None:
    system = [{"type": "text", "text": f"part {i}", "cache_control": _cc()} for i in range(5)]
    err = _error(client, system=system, messages=[{"role": "user", "content": "hi"}])
    assert err["message"] == "A maximum of 4 blocks with cache_control may be provided. Found 5."
    # the top-level automatic breakpoint counts too
    err = _error(client, system=system[:4], cache_control=_cc(), messages=[{"role": "user", "content": "hi"}])
    assert err["message"].endswith("Found 5.")


def test_ttl_order_rule(client: Anthropic) -> None:
    def user(ttl: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "text", "text": "q", "cache_control": _cc(ttl)}]}]

    err = _error(client, system=[{"type": "text", "text": "rules", "cache_control": _cc("5m")}],
                 messages=user("1h"))
    assert err["message"] == f"messages.0.content.0.cache_control.ttl: {TTL_ORDER}"
    err = _error(client, system=[{"type": "text", "text": "a", "cache_control": _cc("5m")},
                                 {"type": "text", "text": "b", "cache_control": _cc("1h")}],
                 messages=[{"role": "user", "content": "q"}])
    assert err["message"] == f"system.1.cache_control.ttl: {TTL_ORDER}"
    assert _ok(client, system=[{"type": "text", "text": "a", "cache_control": _cc("1h")}], messages=user("5m"))


def _ok(client: Anthropic, **kwargs: Any) -> bool:
    return client.messages.create(model=MODEL, max_tokens=1, **kwargs).type == "message"


def test_empty_text_block_and_unsupported_blocks(client: Anthropic) -> None:
    err = _error(client, messages=[{"role": "user", "content": [
        {"type": "text", "text": "", "cache_control": _cc()}, {"type": "text", "text": "q"}]}])
    assert err["message"] == ("messages.0.content.0.cache_control: "
                              "cache_control cannot be set for empty text blocks")
    err = _error(client, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    assert err["message"].startswith("messages.0.content.0.type: content of type 'image' is not supported")


def test_automatic_cache_control_skips_empty_blocks(server: Server, client: Anthropic) -> None:
    """The top-level breakpoint lands on the last non-empty block, never a 400."""
    question = text_of_tokens(server.engine.tokenizer, 100, nonce())
    cases: list[tuple[Any, list[dict[str, str]]]] = [
        ([{"role": "user", "content": [{"type": "text", "text": question}, {"type": "text", "text": ""}]}],
         [{"role": "user", "content": f"{question}\n"}]),
        ([{"role": "user", "content": question}, {"role": "assistant", "content": ""}],
         [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]),
    ]
    for messages, template in cases:
        server.aengine.call(lambda e: e.reset_prefix_cache())
        m = client.messages.create(model=MODEL, max_tokens=1, messages=messages, cache_control=_cc())
        bp = _breakpoint_tokens(server, template, question)
        assert m.usage.cache_creation_input_tokens == bp // BLOCK * BLOCK > 0
        assert _total(m.usage) == len(server.engine.tokenizer.apply_chat_template(template))


def test_stop_sequences(server: Server, client: Anthropic) -> None:
    messages: Any = [{"role": "user", "content": "Stop sequence test."}]  # fixed: the same text every run
    greedy = {"temperature": 0, "ignore_eos": True}
    full = client.messages.create(model=MODEL, max_tokens=12, messages=messages, extra_body=greedy)
    text = "".join(b.text for b in full.content if b.type == "text")
    assert full.stop_reason == "max_tokens" and full.stop_sequence is None and len(text) >= 8
    stop = text[4:8]
    cut = client.messages.create(model=MODEL, max_tokens=12, messages=messages, stop_sequences=[stop],
                                 extra_body=greedy)
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert "".join(b.text for b in cut.content if b.type == "text") == text[: text.find(stop)]
    with client.messages.stream(model=MODEL, max_tokens=12, messages=messages, stop_sequences=[stop],
                                extra_body=greedy) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop
    assert final.model_dump(include={"content", "stop_reason", "stop_sequence"}) == \
        cut.model_dump(include={"content", "stop_reason", "stop_sequence"})
