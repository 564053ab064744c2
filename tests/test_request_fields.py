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
# what each honoured field does is tested where that behaviour lives (usage, sampling, caching,
# tools, structured output, diagnosis tests); this list makes an unclassified new field fail here
HONOURED = {
    "ChatCompletionRequest": {"model", "messages", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
                              "stream_options", "frequency_penalty", "presence_penalty", "ignore_eos",
                              "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options", "logit_bias",
                              "response_format", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs",
                              "tools", "tool_choice"},
    "CompletionRequest": {"model", "prompt", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
                          "stream_options", "frequency_penalty", "presence_penalty", "ignore_eos", "prompt_cache_key",
                          "prompt_cache_retention", "prompt_cache_options", "logit_bias", "response_format",
                          "max_tokens", "logprobs", "echo", "suffix", "best_of"},
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
