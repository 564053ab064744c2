"""OpenAI's Responses API through the official SDK against a real server (random:tiny)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from openai import BadRequestError, NotFoundError, OpenAI
from test_server_harness import KEYS, MODEL, Server, nonce, running, serve, text_of_tokens, tiny_engine

BS = 16


@pytest.fixture(scope="module")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_previous_response_id_reuses_the_first_turn(server: Server, client: OpenAI) -> None:
    question = text_of_tokens(server.engine.tokenizer, 200, nonce())
    first = client.responses.create(model=MODEL, input=question, instructions="Answer briefly.",
                                    max_output_tokens=8, temperature=0)
    assert first.status in ("completed", "incomplete") and first.output_text is not None
    assert first.usage is not None and first.usage.input_tokens_details.cached_tokens == 0
    second = client.responses.create(model=MODEL, input="And then?", previous_response_id=first.id,
                                     instructions="Answer briefly.", max_output_tokens=4, temperature=0)
    assert second.previous_response_id == first.id
    assert second.usage is not None
    # the whole first prompt (whole blocks of it) is reused: the conversation continues it
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens // BS * BS
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    got = client.responses.retrieve(second.id)
    assert got.id == second.id and got.output_text == second.output_text
    items = client.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["message"]
    server.check_integrity()


def test_streaming_events_parse_and_match_the_plain_response(client: OpenAI) -> None:
    prompt = f"{nonce()} Tell me a story about a cache."
    plain = client.responses.create(model=MODEL, input=prompt, max_output_tokens=12, temperature=0, store=False)
    kinds: list[str] = []
    deltas = []
    final = None
    for event in client.responses.create(model=MODEL, input=prompt, max_output_tokens=12, temperature=0,
                                         stream=True, store=False):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type in ("response.completed", "response.incomplete"):
            final = event.response
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert final is not None and final.output_text == plain.output_text == "".join(deltas)
    assert final.usage is not None and final.usage.output_tokens == plain.usage.output_tokens  # type: ignore[union-attr]
    with pytest.raises(NotFoundError):  # store=False kept nothing
        client.responses.retrieve(final.id)


WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                          "required": ["city"], "additionalProperties": False}}


def test_a_function_call_round_trip(client: OpenAI) -> None:
    first = client.responses.create(model=MODEL, input=f"{nonce()} What is the weather in Paris?",
                                    tools=[WEATHER], tool_choice="required", max_output_tokens=64)  # type: ignore[list-item]
    calls = [o for o in first.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    args = json.loads(calls[0].arguments)
    assert isinstance(args.get("city"), str)
    follow = client.responses.create(model=MODEL, previous_response_id=first.id, tools=[WEATHER],  # type: ignore[list-item]
                                     input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                             "output": "sunny, 21 C"}], max_output_tokens=6, temperature=0)
    assert follow.status in ("completed", "incomplete") and follow.usage is not None
    assert follow.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens // BS * BS  # type: ignore[union-attr]
    # the same round trip with the items sent back by hand (no server state)
    manual = client.responses.create(model=MODEL, tools=[WEATHER], store=False, max_output_tokens=4,  # type: ignore[list-item]
                                     input=[{"role": "user", "content": "Weather in Paris?"},
                                            {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                                             "arguments": '{"city": "Paris"}'},
                                            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}])
    assert manual.status in ("completed", "incomplete")


def test_streamed_function_call_events(client: OpenAI) -> None:
    kinds, final = [], None
    for event in client.responses.create(model=MODEL, input="Weather in Rome?", tools=[WEATHER],  # type: ignore[list-item]
                                         tool_choice={"type": "function", "name": "get_weather"},
                                         max_output_tokens=64, stream=True):
        kinds.append(event.type)
        if event.type == "response.completed":
            final = event.response
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert final is not None and [o.type for o in final.output] == ["function_call"]


def test_structured_output(client: OpenAI) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    r = client.responses.create(model=MODEL, input="2+2?", max_output_tokens=40, store=False,
                                text={"format": {"type": "json_schema", "name": "a", "schema": schema}})
    assert isinstance(json.loads(r.output_text)["answer"], int)


def test_retrieve_delete_and_errors(server: Server, client: OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="hello", max_output_tokens=2)
    assert client.responses.retrieve(r.id).id == r.id
    client.responses.delete(r.id)
    with pytest.raises(NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(NotFoundError) as e:
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_nope")
    assert e.value.body["message"] == "Previous response with id 'resp_nope' not found."  # type: ignore[index]
    bad: list[dict[str, Any]] = [
        {"reasoning": {"effort": "high"}},
        {"tools": [{"type": "web_search"}]},
        {"background": True},
        {"truncation": "auto"},
        {"input": [{"type": "function_call", "name": "f"}]},
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        {"not_a_field": 1},
    ]
    for extra in bad:
        body = {"model": MODEL, "input": "hi", **extra}
        resp = httpx.post(f"{server.url}/v1/responses", json=body)
        assert resp.status_code == 400, (extra, resp.text)
        assert resp.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(BadRequestError):
        client.responses.create(model=MODEL, input="hi", tool_choice="required")


def test_stored_responses_belong_to_their_tenant() -> None:
    with running(tiny_engine()) as aengine, serve(aengine, api_keys=KEYS) as srv:
        acme = OpenAI(base_url=f"{srv.url}/v1", api_key="sk-acme-0001", max_retries=0)
        globex = OpenAI(base_url=f"{srv.url}/v1", api_key="sk-globex-0002", max_retries=0)
        r = acme.responses.create(model=MODEL, input="a secret", max_output_tokens=2)
        with pytest.raises(NotFoundError):
            globex.responses.retrieve(r.id)
        with pytest.raises(NotFoundError):
            globex.responses.create(model=MODEL, input="next", previous_response_id=r.id)
        assert acme.responses.retrieve(r.id).id == r.id


def test_a_miss_is_explained_in_responses_and_gemini(server: Server) -> None:
    """x-promptcache-diagnose names the part that changed, in each dialect's own names."""
    text = text_of_tokens(server.engine.tokenizer, 200, nonce())
    diag = {"x-promptcache-diagnose": "true"}

    def responses(instructions: str) -> dict[str, Any]:
        body = {"model": MODEL, "input": text, "instructions": instructions, "max_output_tokens": 1, "store": False}
        return httpx.post(f"{server.url}/v1/responses", json=body, headers=diag, timeout=60).json()

    responses("Answer briefly, please.")
    d = responses("Answer at length, please.")["promptcache_diagnosis"]
    assert d["reason"] == "diverged" and d["divergence"]["path"] == "instructions"

    def gemini(system: str) -> dict[str, Any]:
        body = {"contents": [{"role": "user", "parts": [{"text": text}]}],
                "systemInstruction": {"parts": [{"text": system}]}, "generationConfig": {"maxOutputTokens": 1}}
        return httpx.post(f"{server.url}/v1beta/models/{MODEL}:generateContent", json=body, headers=diag,
                          timeout=60).json()

    gemini("You are terse.")
    d = gemini("You are verbose.")["promptcache_diagnosis"]
    assert d["reason"] == "diverged" and d["divergence"]["path"] == "contents[0].system"
