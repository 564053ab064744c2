"""Why did it miss: diagnoses through the official SDKs against a real server, in both dialects."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from anthropic import Anthropic
from openai import OpenAI
from test_server_harness import KEYS, MODEL, Server, long_text, nonce, running, serve, text_of_tokens, tiny_engine
from test_server_tools import TOOLS_TEMPLATE

from promptcache.model.shapes import random_checkpoint

BLOCK = 16
DIAGNOSE = {"x-promptcache-diagnose": "true"}
ACME, GLOBEX = list(KEYS)


def _openai(server: Server, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def _anthropic(server: Server, key: str = "unused") -> Anthropic:
    return Anthropic(base_url=server.url, api_key=key, max_retries=0)


def _extra(response: Any, name: str) -> Any:
    """A field as plain JSON: one the SDK types (Anthropic's ``diagnostics``) or an extension field
    it keeps as an extra attribute of its model."""
    value = getattr(response, name, None) if name in type(response).model_fields else \
        (response.model_extra or {}).get(name)
    return value.model_dump() if hasattr(value, "model_dump") else value


def _could(prev_prompt_tokens: int, prompt_tokens: int) -> int:
    """Whole-block tokens an unchanged prompt would have reused from the earlier one (its output of
    one token never ran: max_tokens=1)."""
    return min(prev_prompt_tokens, prompt_tokens - 1) // BLOCK * BLOCK


@pytest.fixture(scope="module")
def small() -> Iterator[Server]:
    """A pool of 40 blocks (640 tokens): two 400-token prompts cannot both stay cached."""
    with running(tiny_engine(num_blocks=40, max_model_len=1024)) as aengine, serve(aengine) as srv:
        yield srv


@pytest.fixture(scope="module")
def tools_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """random:tiny with a chat template that renders the tools (the shipped one leaves them out)."""
    checkpoint = tmp_path_factory.mktemp("diag-tools") / "tiny-tools"
    shutil.copytree(random_checkpoint("tiny"), checkpoint)
    config_path = checkpoint / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "chat_template": TOOLS_TEMPLATE}))
    with running(tiny_engine(model=str(checkpoint))) as aengine, serve(aengine, model_names=[MODEL]) as srv:
        yield srv


@pytest.fixture(scope="module")
def keyed() -> Iterator[Server]:
    with running(tiny_engine()) as aengine, serve(aengine, KEYS) as srv:
        yield srv


def test_a_timestamp_in_the_system_message(server: Server) -> None:
    stable = long_text(300, nonce())

    def system(second: int) -> str:
        return f"You are a helpful assistant. Current time: 2026-12-01 10:00:{second:02d}. {stable}"

    client = _openai(server)
    first = client.chat.completions.create(model=MODEL, max_tokens=1, messages=[
        {"role": "system", "content": system(1)}, {"role": "user", "content": "hello"}])
    second = client.chat.completions.create(
        model=MODEL, max_tokens=1, extra_headers=DIAGNOSE,
        messages=[{"role": "system", "content": system(2)}, {"role": "user", "content": "hello"}],
        extra_body={"prompt_cache_options": {"comparison_response_id": first.id}})
    assert first.usage is not None and second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    could = _could(first.usage.prompt_tokens, second.usage.prompt_tokens)
    assert cached is not None and cached < 64 < could  # the timestamp is early: nearly everything missed
    assert _extra(second, "prompt_cache_diagnostics") == {
        "type": "cache_miss", "reason": "input_changed", "cache_missed_tokens": could - cached,
        "comparison_reusable_tokens": cached}
    ours = _extra(second, "promptcache_diagnosis")
    assert ours["reason"] == "diverged" and ours["compared_with"] == first.id and ours["cached_tokens"] == cached
    d = ours["divergence"]
    offset = system(1).index(":01.") + 2  # the seconds' last digit is the first difference
    assert d["path"] == "messages[0].content" and d["kind"] == "system" and d["char_offset"] == offset
    assert "10:00:01" in d["before"] and "10:00:02" in d["after"] and d["looks_like"] == "a timestamp"
    assert cached <= d["token"] < cached + BLOCK  # reuse ended in the block holding the divergence

    anthropic = _anthropic(server)
    m1 = anthropic.messages.create(model=MODEL, max_tokens=1, system=system(3),
                                   messages=[{"role": "user", "content": "hello"}])
    m2 = anthropic.messages.create(model=MODEL, max_tokens=1, system=system(4), extra_headers=DIAGNOSE,
                                   messages=[{"role": "user", "content": "hello"}],
                                   extra_body={"diagnostics": {"previous_message_id": m1.id}})
    read = m2.usage.cache_read_input_tokens or 0
    total = read + (m2.usage.cache_creation_input_tokens or 0) + m2.usage.input_tokens
    prev_total = (m1.usage.cache_read_input_tokens or 0) + (m1.usage.cache_creation_input_tokens or 0) + \
        m1.usage.input_tokens
    assert _extra(m2, "diagnostics") == {"cache_miss_reason": {
        "type": "system_changed", "cache_missed_input_tokens": _could(prev_total, total) - read}}
    d = _extra(m2, "promptcache_diagnosis")["divergence"]
    assert d["path"] == "system" and d["char_offset"] == system(3).index(":03.") + 2


def test_a_volatile_prefix_is_linted_after_repeated_misses(server: Server) -> None:
    client = _openai(server)
    stable = long_text(100, nonce())
    lints = []
    for i in range(4):
        r = client.chat.completions.create(model=MODEL, max_tokens=1, extra_headers=DIAGNOSE, messages=[
            {"role": "system", "content": f"request id 7f3a{i:04d}; {stable}"}, {"role": "user", "content": "x"}])
        lints.append(_extra(r, "promptcache_diagnosis").get("lint"))
    assert lints[:2] == [None, None]  # the first compares with nothing, the second is one miss
    assert lints[3] is not None and "diverged 3 times at messages[0].content" in lints[3], lints


def test_tools_reordered(tools_server: Server) -> None:
    server = tools_server
    def tool(name: str) -> dict[str, Any]:
        return {"type": "function", "function": {"name": name, "description": f"{name} {nonce()}",
                                                 "parameters": {"type": "object", "properties": {}}}}

    a, b = tool("get_weather"), tool("get_time")
    client = _openai(server)
    first = client.chat.completions.create(model=MODEL, max_tokens=1, tools=[a, b],  # type: ignore[list-item]
                                           messages=[{"role": "user", "content": "hi"}])
    second = client.chat.completions.create(model=MODEL, max_tokens=1, tools=[b, a],  # type: ignore[list-item]
                                            messages=[{"role": "user", "content": "hi"}], extra_headers=DIAGNOSE,
                                            extra_body={"prompt_cache_options": {"comparison_response_id": first.id}})
    assert _extra(second, "prompt_cache_diagnostics")["reason"] == "tools_changed"
    d = _extra(second, "promptcache_diagnosis")["divergence"]
    assert d["path"] == "tools[0]" and d["tool"] == "get_time" and "another order" in d["note"]
    anthropic = _anthropic(server)
    ta = {"name": "get_weather", "description": nonce(), "input_schema": {"type": "object"}}
    tb = {"name": "get_time", "description": nonce(), "input_schema": {"type": "object"}}
    m1 = anthropic.messages.create(model=MODEL, max_tokens=1, tools=[ta, tb],  # type: ignore[list-item]
                                   messages=[{"role": "user", "content": "hi"}])
    m2 = anthropic.messages.create(model=MODEL, max_tokens=1, tools=[tb, ta],  # type: ignore[list-item]
                                   messages=[{"role": "user", "content": "hi"}],
                                   extra_body={"diagnostics": {"previous_message_id": m1.id}})
    assert _extra(m2, "diagnostics")["cache_miss_reason"]["type"] == "tools_changed"


def test_evicted_then_expired_blocks_say_so(small: Server) -> None:
    client = _openai(small)
    tok = small.engine.tokenizer
    prompt_a, prompt_b = text_of_tokens(tok, 400, nonce()), text_of_tokens(tok, 400, nonce())

    def ask(prompt: str, **extra: Any) -> Any:
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_headers=DIAGNOSE,
                                         extra_body=extra or None)

    a = ask(prompt_a)
    ask(prompt_b)  # needs the room: a's blocks are evicted
    again = ask(prompt_a, prompt_cache_options={"comparison_response_id": a.id})
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    cached = again.usage.prompt_tokens_details.cached_tokens or 0
    assert cached < _could(a.usage.prompt_tokens, again.usage.prompt_tokens) - 64  # b took most of a's blocks
    assert _extra(again, "prompt_cache_diagnostics") == {"type": "unavailable"}  # no divergence: lost blocks
    ours = _extra(again, "promptcache_diagnosis")
    assert ours["reason"] == "evicted" and ours["lost"]["idle_s"] >= 0 and ours["lost"]["ago_s"] >= 0
    assert ours["cached_tokens"] == cached and "divergence" not in ours  # the same text: no divergence

    kept = ask(prompt_b, prompt_cache_options={"ttl": "1s"})  # cached with a 1 s retention
    time.sleep(1.2)
    ask(prompt_a)  # room again: b's retention has ended, so its blocks go first
    late = ask(prompt_b, prompt_cache_options={"comparison_response_id": kept.id})
    assert _extra(late, "promptcache_diagnosis")["reason"] == "expired"
    assert _extra(late, "prompt_cache_diagnostics") == {"type": "unavailable"}
    metrics = httpx.get(f"{small.url}/metrics").text
    assert 'promptcache_reuse_stops_total{reason="evicted"}' in metrics
    assert 'promptcache_reuse_stops_total{reason="expired"}' in metrics


def test_another_tenant_is_never_shown_and_unknown_ids(keyed: Server) -> None:
    secret = f"acme's secret plan {nonce()} " + long_text(100)
    acme, globex = _openai(keyed, ACME), _openai(keyed, GLOBEX)
    mine = acme.chat.completions.create(model=MODEL, max_tokens=1, messages=[{"role": "user", "content": secret}])
    other = globex.chat.completions.create(
        model=MODEL, max_tokens=1, messages=[{"role": "user", "content": secret}], extra_headers=DIAGNOSE,
        extra_body={"prompt_cache_options": {"comparison_response_id": mine.id}})
    assert _extra(other, "prompt_cache_diagnostics") == {"type": "comparison_response_not_found"}
    seen = _extra(other, "promptcache_diagnosis")  # acme's identical prompt reads as never seen
    assert seen["reason"] == "not_cached" and seen["cached_tokens"] == 0 and "divergence" not in seen
    closest = globex.chat.completions.create(model=MODEL, max_tokens=1, extra_headers=DIAGNOSE,
                                             messages=[{"role": "user", "content": secret + " more"}])
    body = json.dumps(closest.model_dump())
    assert "secret plan" not in body.replace(secret + " more", "")  # only its own text can appear
    ours = _extra(closest, "promptcache_diagnosis")
    assert ours["compared_with"] == other.id  # its own earlier request, never acme's
    m = _anthropic(keyed, GLOBEX).messages.create(
        model=MODEL, max_tokens=1, messages=[{"role": "user", "content": "x"}],
        extra_body={"diagnostics": {"previous_message_id": "msg_unknown"}})
    assert _extra(m, "diagnostics") == {"cache_miss_reason": {"type": "previous_message_not_found"}}
    fresh = _openai(keyed, ACME).chat.completions.create(
        model=MODEL, max_tokens=1, messages=[{"role": "user", "content": long_text(50, nonce())}],
        extra_headers={**DIAGNOSE, "x-promptcache-history": "off"})
    assert _extra(fresh, "promptcache_diagnosis")["compared_with"] == mine.id  # acme's own, closest
    follow = acme.chat.completions.create(
        model=MODEL, max_tokens=1, messages=[{"role": "user", "content": "y"}],
        extra_body={"prompt_cache_options": {"comparison_response_id": fresh.id}})
    assert _extra(follow, "prompt_cache_diagnostics") == {"type": "comparison_response_not_found"}  # not kept


def _expected_cost(prompt: int, cached: int, written_5m: int, output: int) -> float:
    return ((prompt - cached - written_5m) * 1.0 + cached * 0.1 + written_5m * 1.25 + output * 4.0) / 1e6


def test_cost_fields_add_up_in_both_dialects(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="promptcache.requests")
    text = long_text(200, nonce())
    client = _openai(server)
    for _ in range(2):
        r = client.chat.completions.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": text}])
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        cost = _extra(r, "promptcache_cost")
        cached = r.usage.prompt_tokens_details.cached_tokens or 0
        assert cost["total"] == pytest.approx(_expected_cost(r.usage.prompt_tokens, cached, 0,
                                                             r.usage.completion_tokens), abs=1e-9)
        assert cost["total"] == pytest.approx(cost["input"] + cost["cached_input"] + cost["cache_writes"]
                                              + cost["output"], abs=1e-9)
        assert cost["saved"] == pytest.approx(cached * 0.9 / 1e6, abs=1e-9)
    assert cached > 0
    anthropic = _anthropic(server)
    for _ in range(2):
        m = anthropic.messages.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": [
            {"type": "text", "text": text + " anthropic", "cache_control": {"type": "ephemeral"}}]}])
        u = m.usage
        prompt = u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)
        cost = _extra(m, "promptcache_cost")
        assert cost["total"] == pytest.approx(_expected_cost(prompt, u.cache_read_input_tokens or 0,
                                                             u.cache_creation_input_tokens or 0, u.output_tokens),
                                              abs=1e-9)
    assert (u.cache_read_input_tokens or 0) > 0
    lines = [r.getMessage() for r in caplog.records if r.name == "promptcache.requests"]
    assert any(line.startswith("/v1/messages ") and f"cached={u.cache_read_input_tokens}" in line for line in lines)
    assert any("why=reused_all" in line for line in lines) and any("why=not_cached" in line for line in lines)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'promptcache_cost_usd_total{tenant="-"}' in metrics
    assert 'promptcache_cost_without_cache_usd_total{tenant="-"}' in metrics


def test_explain_command_offline(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from promptcache.cli import main

    base = {"model": "default", "max_tokens": 1, "system": "Be brief. Request 7f3a0001. " + long_text(60),
            "messages": [{"role": "user", "content": "What is a KV cache?"}]}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(base))
    b.write_text(json.dumps({**base, "system": base["system"].replace("0001", "0002")}))
    assert main(["explain", str(a), str(b), "--json"]) == 0
    diag = json.loads(capsys.readouterr().out)
    assert diag["reason"] == "diverged" and diag["divergence"]["path"] == "system"
    assert diag["divergence"]["char_offset"] == base["system"].index("0001") + 3
    assert diag["divergence"]["looks_like"] == "a counter"
    b.write_text(json.dumps({**base, "messages": [*base["messages"], {"role": "assistant", "content": "It is..."}]}))
    assert main(["explain", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "B only extends A" in out  # appending a turn keeps the whole prefix
    b.write_text("[1]")
    assert main(["explain", str(a), str(b)]) == 2
    assert "a request body is a JSON object" in capsys.readouterr().err


def test_streams_carry_the_diagnosis_first_and_the_cost_last(server: Server) -> None:
    text = long_text(120, nonce())
    client = _openai(server)
    client.chat.completions.create(model=MODEL, max_tokens=1, messages=[{"role": "user", "content": text}])
    chunks = list(client.chat.completions.create(
        model=MODEL, max_tokens=3, stream=True, stream_options={"include_usage": True}, extra_headers=DIAGNOSE,
        messages=[{"role": "user", "content": text + " and more"}]))
    first = _extra(chunks[0], "promptcache_diagnosis")
    assert first is not None and first["reason"] in ("diverged", "reused_all") and first["cached_tokens"] > 0
    assert all(_extra(c, "promptcache_diagnosis") is None for c in chunks[1:])
    assert chunks[-1].usage is not None and _extra(chunks[-1], "promptcache_cost")["total"] > 0
    anthropic = _anthropic(server)
    with anthropic.messages.stream(model=MODEL, max_tokens=3, extra_headers=DIAGNOSE,
                                   messages=[{"role": "user", "content": text + " anthropic"}]) as stream:
        events = list(stream)
    start = next(e for e in events if e.type == "message_start")
    assert _extra(start.message, "promptcache_diagnosis")["cached_tokens"] > 0
    delta = next(e for e in events if e.type == "message_delta")
    assert _extra(delta, "promptcache_cost")["total"] > 0


def test_history_is_safe_under_concurrent_requests() -> None:
    """Diagnoses run in worker threads: adding, extending and searching at once must not fail
    (an unlocked OrderedDict raised 'mutated during iteration'), and the bounds must hold."""
    import threading
    from array import array

    from promptcache.server.diagnosis import History, Part, PromptRecord

    history = History(max_records=8, max_chars=10_000, max_tenants=2, max_total_chars=15_000)
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            for i in range(300):
                tenant = f"t{(w + i) % 3}"
                history.add(tenant, PromptRecord(f"{w}-{i}", "m", (Part("p", "messages", "x" * 500),),
                                                 array("i", range(i % 50))))
                history.extend(tenant, f"{w}-{i}", [1, 2])
                history.closest(tenant, list(range(40)), "none")
                history.note_divergence(tenant, "p", i % 7)
        except BaseException as e:  # noqa: BLE001 — collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert history._total_chars <= 15_000 and len(history._tenants) <= 2
    assert history._total_chars == sum(t.num_chars for t in history._tenants.values())
