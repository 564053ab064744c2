"""Structured output and logit_bias through the official OpenAI SDK."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import BadRequestError, OpenAI
from test_server_harness import MODEL, Server
from test_structured import SCHEMA, valid


@pytest.fixture(scope="module")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_json_schema_response_format_always_validates(client: OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in range(20):
        r = client.chat.completions.create(model=MODEL, max_tokens=120, temperature=1.0, seed=seed,
                                           response_format=fmt,  # type: ignore[arg-type]
                                           messages=[{"role": "user", "content": "Describe a person."}])
        assert r.choices[0].finish_reason == "stop"
        assert valid(json.loads(r.choices[0].message.content or "")), r.choices[0].message.content
    obj = client.chat.completions.create(model=MODEL, max_tokens=40, temperature=0.0,
                                         response_format={"type": "json_object"},
                                         messages=[{"role": "user", "content": "JSON please"}])
    assert (obj.choices[0].message.content or "").startswith("{")


def test_logit_bias_and_bad_values(client: OpenAI, server: Server) -> None:
    prompt = "The quick brown fox"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0.0, logprobs=0)
    assert plain.choices[0].logprobs is not None and plain.choices[0].logprobs.tokens
    first = server.engine.tokenizer.encode(plain.choices[0].text, add_special_tokens=False)[0]
    banned = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0.0,
                                       logit_bias={str(first): -100})
    assert banned.choices[0].text != plain.choices[0].text
    with pytest.raises(BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, logit_bias={"abc": 1})
    assert info.value.body["param"] == "logit_bias"  # type: ignore[index]
    with pytest.raises(BadRequestError):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, logit_bias={"5": 200})
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema",  # type: ignore[typeddict-item]
                                                        "json_schema": {"name": "x", "schema": {"type": "objectx"}}})
    assert "invalid json_schema" in info.value.message


def test_n_choices_share_one_prefill(client: OpenAI, server: Server) -> None:
    from test_server_harness import nonce, text_of_tokens

    prompt = text_of_tokens(server.engine.tokenizer, 300, nonce())
    before = server.stats()
    r = client.chat.completions.create(model=MODEL, n=3, max_tokens=4, temperature=1.0, seed=11,
                                       messages=[{"role": "user", "content": prompt}])
    after = server.stats()
    assert [c.index for c in r.choices] == [0, 1, 2] and len({c.message.content for c in r.choices}) > 1
    assert r.usage is not None and 3 <= r.usage.completion_tokens <= 12  # summed over the choices
    p = r.usage.prompt_tokens
    computed = after["computed_tokens"] - before["computed_tokens"]
    # the prompt's full blocks once; each choice computes the rest of its last block, then decodes
    shared = (p - 1) // 16 * 16
    assert computed <= p + 2 * (p - shared) + r.usage.completion_tokens, (computed, p)
    again = client.chat.completions.create(model=MODEL, n=3, max_tokens=4, temperature=1.0, seed=11,
                                           messages=[{"role": "user", "content": prompt}])
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # seeded


def test_models_retrieve_unserved_endpoints_and_default_cap(client: OpenAI, server: Server) -> None:
    import httpx
    from anthropic import Anthropic, NotFoundError

    assert client.models.retrieve(MODEL).id == MODEL
    anthropic = Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    assert anthropic.models.retrieve(MODEL).id == MODEL
    with pytest.raises(NotFoundError):
        anthropic.models.retrieve("claude-nope")
    r = httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL, "input": "x"})
    assert r.status_code == 404 and "not supported by this server" in r.json()["error"]["message"]
    assert "Invalid URL" in httpx.post(f"{server.url}/v1/nothing", json={}).json()["error"]["message"]
    from test_server_harness import running, serve, tiny_engine

    with running(tiny_engine()) as aengine, serve(aengine, default_max_tokens=5) as capped:
        r2 = OpenAI(base_url=f"{capped.url}/v1", api_key="x", max_retries=0).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "go"}], extra_body={"ignore_eos": True})
        assert r2.usage is not None and r2.usage.completion_tokens == 5 and r2.choices[0].finish_reason == "length"


def test_logit_bias_keys_must_be_ascii_token_ids(client: OpenAI) -> None:
    for key in ("²", " 5", "-1", "1e3"):
        with pytest.raises(BadRequestError) as info:
            client.completions.create(model=MODEL, prompt="x", max_tokens=1, logit_bias={key: 1})
        assert info.value.body["param"] == "logit_bias", key  # type: ignore[index]


def test_streamed_n_choices_interleave_and_match_the_plain_ones(client: OpenAI, server: Server) -> None:
    import httpx

    messages: Any = [{"role": "user", "content": "stream three please"}]
    plain = client.chat.completions.create(model=MODEL, n=3, max_tokens=5, temperature=1.0, seed=21,
                                           messages=messages)
    stream = client.chat.completions.create(model=MODEL, n=3, max_tokens=5, temperature=1.0, seed=21,
                                            messages=messages, stream=True, stream_options={"include_usage": True})
    texts, finishes, usage = ["", "", ""], [None, None, None], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finishes[c.index] = c.finish_reason or finishes[c.index]
    assert texts == [c.message.content for c in plain.choices]
    assert finishes == [c.finish_reason for c in plain.choices]
    assert usage is not None and plain.usage is not None and usage.completion_tokens == plain.usage.completion_tokens
    r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x", "n": 2, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # completions streams one choice


def test_a_dropped_n_stream_frees_every_choice(server: Server) -> None:
    import httpx
    from test_server_harness import wait_until

    body = {"model": MODEL, "n": 3, "max_tokens": 400, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "go on forever"}]}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for n, _ in enumerate(r.iter_lines()):
            if n > 8:
                break  # hang up mid-stream
    freed = wait_until(lambda: (s := server.stats())["requests_running"] == 0 and s["blocks_in_use"] == 0, 10)
    assert freed, server.stats()
    server.check_integrity()
    ok = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 3  # the server still serves
