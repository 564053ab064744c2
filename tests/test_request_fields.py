"""No field is silently ignored: every top-level request field of every dialect is honoured, an
advisory no-op (documented as such in the spec and accepted), or a 400 naming it."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from test_server_harness import MODEL, Server

OPENAI_ADVISORY = {"user": "u-1", "safety_identifier": "s-1", "metadata": {"k": "v"}, "store": False,
                   "service_tier": "auto", "parallel_tool_calls": True}
ANTHROPIC_ADVISORY = {"metadata": {"user_id": "u-1"}, "service_tier": "auto"}
OPENAI_REFUSED = {"reasoning_effort": "low", "audio": {"voice": "x"}, "modalities": ["text"],
                  "prediction": {"type": "content", "content": "x"}, "functions": [], "function_call": "auto",
                  "web_search_options": {}, "verbosity": "low", "no_such_field": 1}
ANTHROPIC_REFUSED = {"thinking": {"type": "enabled", "budget_tokens": 1024}, "mcp_servers": [], "container": "c",
                     "context_management": {}, "no_such_field": 1}
# every field here is honoured: the probes below change the response with most of them; the rest
# (messages, tools, tool_choice, prompt_cache_*, stream_options, echo/suffix/best_of, diagnostics,
# penalties; return_token_ids in test_stream_tokens.py) are tested where their behaviour lives
# (caching, tools, retention, diagnosis, error tests). This list also makes an unclassified new field fail here.
HONOURED = {
    "ChatCompletionRequest": {"model", "messages", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
                              "stream_options", "frequency_penalty", "presence_penalty", "ignore_eos",
                              "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options", "logit_bias",
                              "response_format", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs",
                              "tools", "tool_choice", "return_token_ids", "return_tokens"},
    "CompletionRequest": {"model", "prompt", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
                          "stream_options", "frequency_penalty", "presence_penalty", "ignore_eos", "prompt_cache_key",
                          "prompt_cache_retention", "prompt_cache_options", "logit_bias", "response_format",
                          "max_tokens", "logprobs", "echo", "suffix", "best_of", "return_token_ids", "return_tokens"},
    "MessagesRequest": {"model", "messages", "system", "tools", "tool_choice", "cache_control", "max_tokens",
                        "temperature", "top_p", "top_k", "stop_sequences", "ignore_eos", "stream", "diagnostics"},
    "CountTokensRequest": {"model", "messages", "system", "tools", "tool_choice", "cache_control"},
}


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}], **extra}


def test_every_field_is_classified_in_the_spec(server: Server) -> None:
    schemas = httpx.get(f"{server.url}/openapi.json").json()["components"]["schemas"]
    advisory = {"ChatCompletionRequest": set(OPENAI_ADVISORY), "CompletionRequest": set(OPENAI_ADVISORY) - {
        "parallel_tool_calls"}, "MessagesRequest": set(ANTHROPIC_ADVISORY), "CountTokensRequest": set()}
    for name, honoured in HONOURED.items():
        props = schemas[name]["properties"]
        assert set(props) == honoured | advisory[name], (name, set(props) ^ (honoured | advisory[name]))
        for field in advisory[name]:
            assert props[field]["description"].startswith("advisory"), (name, field)
        assert schemas[name].get("additionalProperties") is False  # anything else is refused


@pytest.mark.parametrize("field", sorted(OPENAI_ADVISORY))
def test_openai_advisory_fields_are_accepted(server: Server, field: str) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", json=_chat(**{field: OPENAI_ADVISORY[field]}))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field", sorted(OPENAI_REFUSED))
def test_openai_other_fields_are_400s_naming_them(server: Server, field: str) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", json=_chat(**{field: OPENAI_REFUSED[field]}))
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert "not supported by this server" in r.json()["error"]["message"]


@pytest.mark.parametrize("field", sorted(ANTHROPIC_ADVISORY))
def test_anthropic_advisory_fields_are_accepted(server: Server, field: str) -> None:
    r = httpx.post(f"{server.url}/v1/messages", json=_chat(**{field: ANTHROPIC_ADVISORY[field]}))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field", sorted(ANTHROPIC_REFUSED))
def test_anthropic_other_fields_are_400s_naming_them(server: Server, field: str) -> None:
    r = httpx.post(f"{server.url}/v1/messages", json=_chat(**{field: ANTHROPIC_REFUSED[field]}))
    assert r.status_code == 400 and r.json()["type"] == "error", r.text
    assert r.json()["error"]["message"].startswith(f"{field}: this field is not supported by this server")


def _post(server: Server, path: str, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    r = httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _text(r: dict[str, Any]) -> str:
    if "choices" in r:
        c = r["choices"][0]
        return str(c.get("message", {}).get("content") or c.get("text") or "")
    return "".join(b.get("text", "") for b in r["content"])


# each honoured field, sent with a value that must change the response against the same request
# without it (a field that had no effect would fail here); base requests are greedy with ignore_eos
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story about caches"}],
        "max_tokens": 6, "temperature": 0.0, "ignore_eos": True}
CHAT_PROBES: dict[str, tuple[dict[str, Any], Any]] = {
    "max_tokens": ({"max_tokens": 2}, lambda r: r["usage"]["completion_tokens"] == 2),
    "max_completion_tokens": ({"max_completion_tokens": 3}, lambda r: r["usage"]["completion_tokens"] == 3),
    "temperature": ({"temperature": 2.0, "seed": 1}, None),  # output differs from greedy
    "top_k": ({"temperature": 1.0, "seed": 3, "top_k": 1}, "greedy"),  # top_k=1 is greedy again
    "top_p": ({"temperature": 1.0, "seed": 3, "top_p": 1e-6}, "greedy"),  # the top token only
    "seed": ({"temperature": 1.0, "seed": 5}, None),
    "stop": (None, None),  # built from the base output below
    "n": ({"n": 2, "temperature": 1.0, "seed": 2}, lambda r: len(r["choices"]) == 2),
    "logprobs": ({"logprobs": True}, lambda r: r["choices"][0]["logprobs"] is not None),
    "top_logprobs": ({"logprobs": True, "top_logprobs": 3},
                     lambda r: len(r["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 3),
    "logit_bias": (None, None),  # built from the base output below
    "response_format": ({"response_format": {"type": "json_object"}, "max_tokens": 30, "ignore_eos": False},
                        lambda r: _text(r).startswith("{")),
    "ignore_eos": (None, None),  # built below: EOS forced by logit_bias ends the output only without it
    "stream": ({"stream": True}, "stream"),
}


def test_honoured_openai_fields_change_the_response(server: Server) -> None:
    base = _post(server, "/v1/chat/completions", CHAT)
    greedy = _text(base)
    tok = server.engine.tokenizer
    first_token = tok.encode(greedy, add_special_tokens=False)[0]
    CHAT_PROBES["stop"] = ({"stop": [greedy[2:4]]}, lambda r: len(_text(r)) < len(greedy))
    CHAT_PROBES["logit_bias"] = ({"logit_bias": {str(first_token): -100}}, None)
    eos = str(tok.eos_token_id)
    CHAT_PROBES["ignore_eos"] = ({"ignore_eos": False, "logit_bias": {eos: 100}},
                                 lambda r: r["usage"]["completion_tokens"] == 1)
    forced_eos = _post(server, "/v1/chat/completions", {**CHAT, "logit_bias": {eos: 100}})
    assert forced_eos["usage"]["completion_tokens"] == 6  # with ignore_eos the forced EOS does not stop it
    for field, (extra, check) in CHAT_PROBES.items():
        body = {k: v for k, v in {**CHAT, **extra}.items() if v is not None}
        if check == "stream":
            r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
            assert r.headers["content-type"].startswith("text/event-stream"), field
            continue
        r = _post(server, "/v1/chat/completions", body)
        if check is None:
            assert _text(r) != greedy, field
        elif check == "greedy":
            assert _text(r) == greedy, field
        else:
            assert check(r), (field, r)


def test_honoured_anthropic_fields_change_the_response(server: Server) -> None:
    body = {"model": MODEL, "max_tokens": 6, "temperature": 0.0, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me a story about caches"}]}
    base = _post(server, "/v1/messages", body)
    greedy = _text(base)
    assert _post(server, "/v1/messages", {**body, "max_tokens": 2})["usage"]["output_tokens"] == 2
    assert _text(_post(server, "/v1/messages", {**body, "system": "Be terse."})) != greedy
    assert _text(_post(server, "/v1/messages", {**body, "temperature": 1.0, "top_k": 1})) == greedy
    assert len(_text(_post(server, "/v1/messages", {**body, "stop_sequences": [greedy[2:4]]}))) < len(greedy)
    from test_server_harness import long_text, nonce

    cached = {**body, "cache_control": {"type": "ephemeral"},
              "messages": [{"role": "user", "content": long_text(60, nonce())}]}
    assert _post(server, "/v1/messages", cached)["usage"]["cache_creation_input_tokens"] > 0
    fresh = {**body, "messages": [{"role": "user", "content": long_text(60, nonce())}]}
    assert _post(server, "/v1/messages", fresh)["usage"]["cache_creation_input_tokens"] == 0  # nothing asked
    r = httpx.post(f"{server.url}/v1/messages", json={**body, "stream": True}, timeout=60)
    assert r.headers["content-type"].startswith("text/event-stream")


# The Responses API and Gemini: every top-level field honoured (tested where its behaviour lives:
# test_server_responses.py, test_server_gemini.py), advisory, or refused with a 400 naming it
RESPONSES_FIELDS = {
    "honoured": {"model", "input", "instructions", "previous_response_id", "store", "stream", "max_output_tokens",
                 "temperature", "top_p", "top_k", "seed", "tools", "tool_choice", "text", "prompt_cache_key",
                 "prompt_cache_retention", "prompt_cache_options", "metadata", "ignore_eos"},
    "advisory": {"user", "safety_identifier", "service_tier", "parallel_tool_calls", "include", "max_tool_calls",
                 "stream_options"},
    "refused_unless_off": {"reasoning": {"effort": "high"}, "background": True, "truncation": "auto",
                           "top_logprobs": 2},
}
GEMINI_FIELDS = {
    "honoured": {"contents", "systemInstruction", "tools", "toolConfig", "generationConfig", "cachedContent", "model"},
    "advisory": {"safetySettings", "labels"},
}


def test_responses_and_gemini_fields_are_classified(server: Server) -> None:
    schemas = httpx.get(f"{server.url}/openapi.json").json()["components"]["schemas"]
    r = RESPONSES_FIELDS
    props = schemas["ResponseCreateRequest"]["properties"]
    assert set(props) == r["honoured"] | r["advisory"] | set(r["refused_unless_off"])  # type: ignore[arg-type]
    for field in r["advisory"]:
        assert "advisory" in props[field]["description"], field
    assert schemas["ResponseCreateRequest"].get("additionalProperties") is False
    g = schemas["GenerateContentRequest"]
    assert set(g["properties"]) == GEMINI_FIELDS["honoured"] | GEMINI_FIELDS["advisory"]
    assert g.get("additionalProperties") is False


@pytest.mark.parametrize("field", sorted(RESPONSES_FIELDS["refused_unless_off"]))  # type: ignore[arg-type]
def test_responses_fields_the_server_cannot_honour_are_400s(server: Server, field: str) -> None:
    value = RESPONSES_FIELDS["refused_unless_off"][field]  # type: ignore[index]
    r = httpx.post(f"{server.url}/v1/responses", json={"model": MODEL, "input": "hi", field: value})
    assert r.status_code == 400 and field in (r.json()["error"]["param"] or ""), r.text


@pytest.mark.parametrize("field", ["user", "safety_identifier", "service_tier", "include"])
def test_responses_advisory_fields_are_accepted(server: Server, field: str) -> None:
    value: Any = ["message.output_text.logprobs"] if field == "include" else "x"
    r = httpx.post(f"{server.url}/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 1,
                                                       "store": False, field: value})
    assert r.status_code == 200, r.text


def test_gemini_unknown_fields_are_400s_naming_them(server: Server) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 1}}
    for extra, name in (({"bogus": 1}, "bogus"),
                        ({"generationConfig": {"maxOutputTokens": 1, "mediaResolution": "LOW"}}, "mediaResolution")):
        r = httpx.post(f"{server.url}/v1beta/models/{MODEL}:generateContent", json={**body, **extra})
        assert r.status_code == 400 and name in r.json()["error"]["message"], r.text
        assert "not supported by this server" in r.json()["error"]["message"]
    ok = httpx.post(f"{server.url}/v1beta/models/{MODEL}:generateContent",
                    json={**body, "safetySettings": [{"category": "HARM_CATEGORY_HATE_SPEECH",
                                                      "threshold": "BLOCK_NONE"}], "labels": {"team": "a"}})
    assert ok.status_code == 200, ok.text
