"""Structured output and logit_bias through the official OpenAI SDK."""

from __future__ import annotations

import json

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
