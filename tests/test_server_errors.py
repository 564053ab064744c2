"""Tenants and errors: 401 / 404 / 400 / 429 in each dialect's envelope, never a 500."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from anthropic import Anthropic
from anthropic import AuthenticationError as AnthropicAuthError
from anthropic import NotFoundError as AnthropicNotFound
from anthropic import RateLimitError as AnthropicRateLimit
from openai import AuthenticationError, BadRequestError, NotFoundError, OpenAI, RateLimitError
from test_server_harness import KEYS, MODEL, Server, nonce, running, serve, text_of_tokens, tiny_engine

ACME, GLOBEX = "sk-acme-0001", "sk-globex-0002"
OPENAI_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with running(tiny_engine(max_model_len=2048)) as aengine, serve(aengine, KEYS) as srv:
        yield srv


def _openai(server: Server, key: str = ACME) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def _anthropic(server: Server, key: str = ACME) -> Anthropic:
    return Anthropic(base_url=server.url, api_key=key, max_retries=0)


def _cached(client: OpenAI, prompt: str) -> int:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=1)
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    return int(r.usage.prompt_tokens_details.cached_tokens or 0)


def test_tenants_never_share_cache(server: Server) -> None:
    prompt = text_of_tokens(server.engine.tokenizer, 200, nonce())
    acme, globex = _openai(server, ACME), _openai(server, GLOBEX)
    assert _cached(acme, prompt) == 0
    assert _cached(acme, prompt) > 0  # same tenant: reused
    assert _cached(globex, prompt) == 0  # same prompt, other tenant: nothing reused
    # Anthropic clients authenticate with x-api-key and land in the same namespace as their key
    m = _anthropic(server, GLOBEX).messages.create(model=MODEL, max_tokens=1,
                                                   messages=[{"role": "user", "content": prompt}])
    assert m.usage.cache_read_input_tokens and m.usage.cache_read_input_tokens > 0
    # nothing a client sends (prompt_cache_key, user) moves it into another namespace
    r = globex.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt + " x"}],
                                       max_tokens=1, prompt_cache_key="acme", user="acme")
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    other = text_of_tokens(server.engine.tokenizer, 100, nonce())
    assert _cached(acme, other) == 0
    r = globex.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": other}],
                                       max_tokens=1, prompt_cache_key="acme")
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_401_in_both_dialects(server: Server) -> None:
    with pytest.raises(AuthenticationError) as info:
        _openai(server, "sk-wrong").models.list()
    assert "sk-wrong" not in _check_openai(info.value.body, code="invalid_api_key")["message"]  # redacted
    r = httpx.get(f"{server.url}/v1/models")  # no key at all (the SDKs always send one)
    assert r.status_code == 401
    _check_openai(r.json()["error"], code="invalid_api_key")
    with pytest.raises(AnthropicAuthError) as ainfo:
        _anthropic(server, "sk-wrong").messages.create(model=MODEL, max_tokens=1,
                                                       messages=[{"role": "user", "content": "hi"}])
    assert ainfo.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                           "message": "invalid x-api-key"}}
    r = httpx.post(f"{server.url}/v1/messages", json={})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/health").status_code == 200  # health and metrics stay open
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def _check_openai(body: Any, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    assert isinstance(body, dict) and set(body) == OPENAI_KEYS
    assert body["type"] == "invalid_request_error" and body["code"] == code
    if param is not None:
        assert body["param"] == param
    return body


def test_unknown_model_is_404(server: Server) -> None:
    with pytest.raises(NotFoundError) as info:
        _openai(server).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert "gpt-9" in _check_openai(info.value.body, code="model_not_found", param="model")["message"]
    with pytest.raises(AnthropicNotFound) as ainfo:
        _anthropic(server).messages.create(model="claude-9", max_tokens=1,
                                           messages=[{"role": "user", "content": "hi"}])
    assert ainfo.value.body == {"type": "error", "error": {"type": "not_found_error", "message": "model: claude-9"}}


def test_prompt_longer_than_context_is_400_naming_both_numbers(server: Server) -> None:
    text = text_of_tokens(server.engine.tokenizer, 2100, nonce())
    n = len(server.engine.tokenizer.apply_chat_template([{"role": "user", "content": text}]))
    with pytest.raises(BadRequestError) as info:
        _openai(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}])
    message = _check_openai(info.value.body)["message"]
    assert str(n) in message and "2048" in message
    r = httpx.post(f"{server.url}/v1/messages", headers={"x-api-key": ACME}, json={
        "model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert str(n) in r.json()["error"]["message"] and "2048" in r.json()["error"]["message"]


def _post(server: Server, path: str, body: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else None
    return httpx.post(f"{server.url}{path}", headers={"Authorization": f"Bearer {ACME}",
                                                      "content-type": "application/json"},
                      content=content, json=None if content is not None else body)


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "lots"}, "max_tokens"),
    ({"model": MODEL, "messages": "hello"}, "messages"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 7}, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    (b'{"model": "x", "messages": [', None),
])
def test_openai_bad_requests_are_400(server: Server, body: Any, param: str | None) -> None:
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = _check_openai(r.json()["error"], param=param)
    if param is None:
        assert err["message"].startswith("the request body is not valid JSON")


@pytest.mark.parametrize("body, start", [
    ({"model": MODEL, "max_tokens": 1, "messages": "hi"}, "messages: "),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, "max_tokens: Field required"),
    ({"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}], "top_p": 0},
     "top_p must be in (0, 1]"),
    ({"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages.0.content.0.text: "),
    ({"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}],
      "cache_control": {"type": "ephemeral", "ttl": "2h"}}, "cache_control.ttl: "),
    (b"{not json", "the request body is not valid JSON"),
])
def test_anthropic_bad_requests_are_400(server: Server, body: Any, start: str) -> None:
    content = body if isinstance(body, bytes) else None
    r = httpx.post(f"{server.url}/v1/messages", headers={"x-api-key": ACME, "content-type": "application/json"},
                   content=content, json=None if content is not None else body)
    assert r.status_code == 400, r.text
    payload = r.json()
    assert set(payload) == {"type", "error"} and payload["type"] == "error"
    assert payload["error"]["type"] == "invalid_request_error"
    assert payload["error"]["message"].startswith(start), payload


def test_full_queue_is_429_with_retry_after() -> None:
    with running(tiny_engine(num_blocks=64), max_waiting=0) as aengine, serve(aengine) as srv:
        with pytest.raises(RateLimitError) as info:
            OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        assert int(info.value.response.headers["retry-after"]) >= 1
        body = info.value.body
        assert isinstance(body, dict) and body["code"] == "rate_limit_exceeded"
        with pytest.raises(AnthropicRateLimit) as ainfo:
            Anthropic(base_url=srv.url, api_key="x", max_retries=0).messages.create(
                model=MODEL, max_tokens=1, messages=[{"role": "user", "content": "hi"}])
        assert int(ainfo.value.response.headers["retry-after"]) >= 1
        assert isinstance(ainfo.value.body, dict) and ainfo.value.body["error"]["type"] == "rate_limit_error"
        assert srv.stats()["blocks_in_use"] == 0
