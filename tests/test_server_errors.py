"""Tenants and errors: 401 / 404 / 400 / 413 in each dialect's envelope, never a 500."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from anthropic import Anthropic
from anthropic import AuthenticationError as AnthropicAuthError
from anthropic import NotFoundError as AnthropicNotFound
from anthropic import RequestTooLargeError as AnthropicTooLarge
from openai import APIStatusError, AuthenticationError, BadRequestError, NotFoundError, OpenAI
from test_server_harness import KEYS, MODEL, Server, nonce, running, serve, text_of_tokens, tiny_engine

ACME, GLOBEX, OPS = "sk-acme-0001", "sk-globex-0002", "sk-ops-0003"
OPENAI_KEYS = {"message", "type", "param", "code"}
MAX_REQUEST_BYTES = 1 << 20


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with running(tiny_engine(max_model_len=2048)) as aengine, \
            serve(aengine, KEYS, max_request_bytes=MAX_REQUEST_BYTES, admin_keys=(OPS,)) as srv:
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
    with pytest.raises(AnthropicAuthError):
        _anthropic(server, "sk-wrong").messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def test_metrics_and_health_details_need_an_operator_key(server: Server) -> None:
    """With API keys, /metrics and /health's details show every tenant's traffic: operators only.
    Plain liveness stays open (load balancers probe it without a key)."""
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    tenant = {"authorization": f"Bearer {ACME}"}
    assert httpx.get(f"{server.url}/health", headers=tenant).json() == {"status": "ok"}
    for headers in ({}, tenant, {"x-api-key": GLOBEX}, {"authorization": "Bearer sk-ops-wrong"}):
        r = httpx.get(f"{server.url}/metrics", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert "promptcache_" not in r.text
    ops = {"authorization": f"Bearer {OPS}"}
    r = httpx.get(f"{server.url}/metrics", headers=ops)
    assert r.status_code == 200 and "promptcache_prefix_cache_hit_rate" in r.text
    detailed = httpx.get(f"{server.url}/health", headers={"x-api-key": OPS}).json()
    assert detailed["status"] == "ok" and "blocks_total" in detailed and detailed["model"] == MODEL


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/messages",
                                  "/v1/messages/count_tokens"])
def test_auth_comes_before_the_body(server: Server, path: str) -> None:
    """No key and a body that is not JSON (or is too large): 401, the body is never read."""
    for body in (b'{"model": ', b"x" * (MAX_REQUEST_BYTES + 1)):
        r = httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 401, r.text
        payload = r.json()
        if path.startswith("/v1/messages"):
            assert payload["error"]["type"] == "authentication_error"
        else:
            _check_openai(payload["error"], code="invalid_api_key")


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
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 9}, "n"),  # more than MAX_CHOICES
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "prompt_cache_options": {"ttl": "31d"}},
     "prompt_cache_options.ttl"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "prompt_cache_options": {"ttl": "nanh"}},
     "prompt_cache_options.ttl"),
    (b'{"model": "x", "messages": [', None),
    # strict JSON types: lax coercion once streamed on "yes" and ran [true, false] as token ids [1, 0]
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5}, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "seed": "7"}, "seed"),
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
    ({"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
     "stream: "),
    ({"model": MODEL, "max_tokens": "1", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens: "),
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


def test_lone_surrogates_are_400_in_both_dialects(server: Server) -> None:
    """``"\\ud800"`` is valid JSON but no valid text: a 400 wherever it is, never a 500."""
    lone = "\ud800"  # json.dumps writes it as the escape \ud800
    chat, user = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, {"role": "user", "content": "hi"}
    anthropic = {**chat, "max_tokens": 1}
    cases = [
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": f"hi {lone}"}]}, "messages"),
        ("/v1/chat/completions", {**chat, "model": lone}, "model"),
        ("/v1/completions", {"model": MODEL, "prompt": f"a{lone}b"}, "prompt"),
        ("/v1/messages", {**anthropic, "system": lone, "messages": [user]}, "system"),
        ("/v1/messages", {**anthropic, "messages": [{"role": "user", "content": [{"type": "text", "text": lone}]}]},
         "messages"),
        ("/v1/messages", {**anthropic, "model": lone}, "model"),
    ]
    for path, body, field in cases:
        r = _post(server, path, json.dumps(body).encode())
        assert r.status_code == 400, (path, body, r.text)
        payload = r.json()
        if path == "/v1/messages":
            assert payload["type"] == "error" and payload["error"]["type"] == "invalid_request_error"
            message = payload["error"]["message"]
        else:
            message = _check_openai(payload["error"], param=field)["message"]
        assert message.startswith(f"{field}: contains a lone UTF-16 surrogate"), message


def test_oversized_body_is_413_in_both_dialects(server: Server) -> None:
    text = "word " * (MAX_REQUEST_BYTES // 5)
    with pytest.raises(APIStatusError) as info:
        _openai(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}])
    assert info.value.status_code == 413
    body = info.value.body
    assert isinstance(body, dict) and set(body) == OPENAI_KEYS and body["type"] == "invalid_request_error"
    assert str(MAX_REQUEST_BYTES) in body["message"]
    with pytest.raises(AnthropicTooLarge) as ainfo:
        _anthropic(server).messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": text}])
    assert ainfo.value.body == {"type": "error", "error": {"type": "request_too_large", "message": body["message"]}}

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies to the bytes received
        yield b'{"model": "%s", "max_tokens": 1, "messages": [{"role": "user", "content": "' % MODEL.encode()
        for _ in range(MAX_REQUEST_BYTES // 65536 + 1):
            yield b"a" * 65536
        yield b'"}]}'

    r = httpx.post(f"{server.url}/v1/messages", content=chunks(),
                   headers={"x-api-key": ACME, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"


def test_prompt_too_long_to_tokenize_is_refused_before_tokenizing(server: Server) -> None:
    """Under the body limit but more characters than the context could ever hold: a 400 for both
    count_tokens and generation, without running the tokenizer over it."""
    text = "a" * (MAX_REQUEST_BYTES - 1000)
    err = _anthropic_error(server, "/v1/messages/count_tokens",
                           {"model": MODEL, "messages": [{"role": "user", "content": text}]})
    assert err["type"] == "invalid_request_error" and "characters long" in err["message"]
    with pytest.raises(BadRequestError) as info:
        _openai(server).completions.create(model=MODEL, prompt=text, max_tokens=1)
    assert "characters long" in _check_openai(info.value.body, param="prompt")["message"]


def _anthropic_error(server: Server, path: str, body: Any) -> dict[str, Any]:
    r = httpx.post(f"{server.url}{path}", headers={"x-api-key": ACME}, json=body)
    assert r.status_code == 400, r.text
    payload = r.json()
    assert set(payload) == {"type", "error"} and payload["type"] == "error"
    return dict(payload["error"])


@pytest.fixture
def renders(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts chat-template renders in this process (the server runs in a thread here)."""
    import promptcache.server.prompt as prompt_mod

    calls: list[int] = []
    real = prompt_mod.render

    def counting(*args: Any, **kwargs: Any) -> str:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(prompt_mod, "render", counting)
    return calls


def test_breakpoints_are_bounded_before_any_rendering(server: Server, renders: list[int]) -> None:
    """Each breakpoint costs a render and a tokenization: 1,000 of them took 64 s to be refused."""
    part = {"type": "text", "text": "x", "prompt_cache_breakpoint": {"mode": "explicit"}}
    for count, status in ((5, 400), (1000, 400)):
        r = httpx.post(f"{server.url}/v1/chat/completions", headers={"authorization": f"Bearer {ACME}"},
                       json={"model": MODEL, "max_tokens": 1, "prompt_cache_options": {"mode": "explicit"},
                             "messages": [{"role": "user", "content": [part] * count}]})
        assert r.status_code == status, r.text
        assert f"At most 4 content parts may carry prompt_cache_breakpoint; found {count}." in r.json()["error"][
            "message"]
    assert renders == []
    ok = httpx.post(f"{server.url}/v1/chat/completions", headers={"authorization": f"Bearer {ACME}"},
                    json={"model": MODEL, "max_tokens": 1, "prompt_cache_options": {"mode": "explicit"},
                          "messages": [{"role": "user", "content": [part] * 4}]})
    assert ok.status_code == 200 and len(renders) >= 1


def test_too_much_content_is_refused_before_rendering(server: Server, renders: list[int]) -> None:
    from promptcache.server.state import prompt_char_limit

    limit = prompt_char_limit(server.aengine.info.tokenizer, server.aengine.info.max_model_len)
    many = [{"role": "user", "content": ""}] * (server.aengine.info.max_model_len + 1)  # a token each at least
    big = [{"role": "user", "content": "a" * (limit + 1)}]
    assert len(json.dumps(big)) < MAX_REQUEST_BYTES and len(json.dumps(many)) < MAX_REQUEST_BYTES
    for messages in (many, big):
        with pytest.raises(BadRequestError) as info:
            _openai(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=1)  # type: ignore[arg-type]
        assert "context can hold" in _check_openai(info.value.body, param="messages")["message"]
        err = _anthropic_error(server, "/v1/messages", {"model": MODEL, "max_tokens": 1, "messages": messages})
        assert "context can hold" in err["message"]
    assert renders == []


def test_token_ids_must_be_integers_not_booleans(server: Server) -> None:
    r = httpx.post(f"{server.url}/v1/completions", headers={"authorization": f"Bearer {ACME}"},
                   json={"model": MODEL, "prompt": [True, False], "max_tokens": 1})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("prompt")
    ok = httpx.post(f"{server.url}/v1/completions", headers={"authorization": f"Bearer {ACME}"},
                    json={"model": MODEL, "prompt": [11, 12.0, 13], "max_tokens": 2.0, "temperature": 1})
    assert ok.status_code == 200, ok.text  # an int for a number, an integral number for an int: fine
    assert ok.json()["usage"]["prompt_tokens"] == 3 and ok.json()["usage"]["completion_tokens"] == 2


def test_bodies_are_parsed_off_the_loop_and_counts_bounded_before_validation(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """900k empty messages (29.7 MB) spent 6.6 s validating on the event loop; now decoding and
    validation run in a worker thread and a list the context cannot hold is refused before any
    model is built (the test server's 1 MiB limit would 413 them, so the parser is called directly
    for the big bodies, and over HTTP for a small one)."""
    import threading

    from promptcache.server import body as body_mod
    from promptcache.server.schemas_openai import ChatCompletionRequest, CompletionRequest

    validated: list[str] = []
    parsed_on: list[str] = []
    real_parse, real_validate = body_mod.parse_body, ChatCompletionRequest.model_validate

    def recording_parse(*args: Any) -> Any:
        parsed_on.append(threading.current_thread().name)
        return real_parse(*args)

    def recording_validate(obj: Any, *args: Any, **kwargs: Any) -> Any:
        validated.append("chat")
        return real_validate(obj, *args, **kwargs)

    monkeypatch.setattr(body_mod, "parse_body", recording_parse)
    monkeypatch.setattr(ChatCompletionRequest, "model_validate", recording_validate)
    max_len = server.aengine.info.max_model_len
    huge = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": ""}] * 900_000}).encode()
    with pytest.raises(body_mod.ApiError) as info:
        real_parse(ChatCompletionRequest, huge, max_len)
    assert info.value.status == 400 and "900000 messages" in info.value.message and validated == []
    ids = json.dumps({"model": MODEL, "prompt": [7] * 6_000_000}).encode()
    with pytest.raises(body_mod.ApiError) as info:
        real_parse(CompletionRequest, ids, max_len)
    assert info.value.param == "prompt" and "6000000 token ids" in info.value.message
    many = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": ""}] * (max_len + 1)}
    r = httpx.post(f"{server.url}/v1/chat/completions", headers={"authorization": f"Bearer {ACME}"}, json=many)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert validated == [] and parsed_on and all(name.startswith("AnyIO worker") for name in parsed_on), parsed_on
    r = httpx.post(f"{server.url}/v1/chat/completions", headers={"authorization": f"Bearer {ACME}"},
                   json={**many, "messages": many["messages"][:2]})
    assert r.status_code == 200 and validated == ["chat"], r.text


def test_body_must_be_json(server: Server) -> None:
    headers = {"authorization": f"Bearer {ACME}"}
    r = httpx.post(f"{server.url}/v1/chat/completions", headers={**headers, "content-type": "text/plain"},
                   content=json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
    assert r.status_code == 400 and "must be JSON" in r.json()["error"]["message"], r.text
    for raw, expect in ((b"", "missing or empty"), (b"{", "not valid JSON"), (b"\xff\xfe", "not valid JSON"),
                        (b"[" * 100_000, "nests JSON too deeply")):
        r = httpx.post(f"{server.url}/v1/messages", headers={"x-api-key": ACME, "content-type": "application/json"},
                       content=raw)
        assert r.status_code == 400 and r.json()["type"] == "error", r.text
        assert expect in r.json()["error"]["message"], r.text
