"""Agents' loops through the official SDKs: forced tool calls, tool results, cached turns."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import BadRequestError, OpenAI
from test_server_harness import MODEL, Server, long_text, nonce

BLOCK = 16
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
                   "required": ["zone"], "additionalProperties": False}}}


def _weather_args_valid(args: Any) -> bool:
    return (isinstance(args, dict) and set(args) == {"city", "unit"} and isinstance(args["city"], str)
            and len(args["city"]) <= 12 and args["unit"] in ("celsius", "fahrenheit"))


@pytest.fixture(scope="module")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_openai_two_turn_tool_loop_reuses_the_first_turn(client: OpenAI) -> None:
    system = {"role": "system", "content": "You are a weather agent. " + long_text(80, nonce())}
    user = {"role": "user", "content": "What is the weather in Paris?"}
    first = client.chat.completions.create(
        model=MODEL, max_tokens=60, messages=[system, user], tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert _weather_args_valid(json.loads(call.function.arguments)), call.function.arguments
    assert first.usage is not None
    history: list[Any] = [system, user, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                          {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    second = client.chat.completions.create(model=MODEL, max_tokens=4, messages=history,
                                            tools=[WEATHER, TIME], tool_choice="none")  # type: ignore[list-item]
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens or 0
    # the system prompt, the tools and the question come from the cache — and the call's own tokens
    # as far as the re-rendered call tokenizes as it was sampled (the grammar writes it in the JSON
    # the template renders back; a sampled token split BPE would not make ends the reuse there)
    assert cached >= (first.usage.prompt_tokens - 1) // BLOCK * BLOCK, (cached, first.usage.prompt_tokens)
    assert second.choices[0].finish_reason in ("stop", "length") and not second.choices[0].message.tool_calls


def test_required_tool_choice_and_streamed_calls_reassemble(client: OpenAI) -> None:
    messages: Any = [{"role": "user", "content": f"time or weather? {nonce()}"}]
    for seed in range(5):
        r = client.chat.completions.create(model=MODEL, max_tokens=60, messages=messages, seed=seed,
                                           temperature=1.0, tools=[WEATHER, TIME],  # type: ignore[list-item]
                                           tool_choice="required")
        call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
        args = json.loads(call.function.arguments)
        assert call.function.name in ("get_weather", "get_time")
        assert _weather_args_valid(args) if call.function.name == "get_weather" else set(args) == {"zone"}
        stream = client.chat.completions.create(model=MODEL, max_tokens=60, messages=messages, seed=seed,
                                                temperature=1.0, tools=[WEATHER, TIME],  # type: ignore[list-item]
                                                tool_choice="required", stream=True)
        deltas = [c.choices[0].delta for c in stream if c.choices]
        calls = [tc for d in deltas for tc in (d.tool_calls or [])]
        assert len(calls) == 1 and calls[0].function is not None
        assert (calls[0].function.name, json.loads(calls[0].function.arguments or "")) == (call.function.name, args)
        assert not "".join(d.content or "" for d in deltas)  # the call is not also streamed as text


def test_tool_choice_errors(client: OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "x"}]
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(model=MODEL, max_tokens=4, messages=messages, tools=[WEATHER],  # type: ignore[list-item]
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert info.value.body["param"] == "tool_choice"  # type: ignore[index]
    with pytest.raises(BadRequestError):
        client.chat.completions.create(model=MODEL, max_tokens=4, messages=messages, tool_choice="required")


ANTHROPIC_WEATHER = {"name": "get_weather", "description": "Current weather in a city",
                     "input_schema": WEATHER["function"]["parameters"]}  # type: ignore[index]
ANTHROPIC_TIME = {"name": "get_time", "description": "Current time in a zone",
                  "input_schema": TIME["function"]["parameters"]}  # type: ignore[index]


def test_anthropic_two_turn_tool_loop_and_streamed_tool_use(server: Server) -> None:
    from anthropic import Anthropic

    client = Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    system = "You are a weather agent. " + long_text(80, nonce())
    user = {"role": "user", "content": "What is the weather in Paris?"}
    tools: Any = [ANTHROPIC_WEATHER, ANTHROPIC_TIME]
    first = client.messages.create(model=MODEL, max_tokens=60, system=system, messages=[user], tools=tools,
                                   tool_choice={"type": "tool", "name": "get_weather"})
    assert first.stop_reason == "tool_use"
    use = next(b for b in first.content if b.type == "tool_use")
    assert use.name == "get_weather" and use.id.startswith("toolu_") and _weather_args_valid(use.input)
    history: Any = [user, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                  "content": '{"temperature": 21}'}]}]
    second = client.messages.create(model=MODEL, max_tokens=4, system=system, messages=history, tools=tools,
                                    tool_choice={"type": "none"})
    prompt_1 = first.usage.input_tokens + (first.usage.cache_read_input_tokens or 0) + \
        (first.usage.cache_creation_input_tokens or 0)
    read = second.usage.cache_read_input_tokens or 0
    assert read >= (prompt_1 - 1) // BLOCK * BLOCK, (read, prompt_1)  # system, tools and the first turn
    assert second.stop_reason in ("end_turn", "max_tokens")
    with client.messages.stream(model=MODEL, max_tokens=60, system=system, messages=[user], tools=tools,
                                tool_choice={"type": "any"}) as stream:
        final = stream.get_final_message()
    uses = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and len(uses) == 1 and uses[0].name in ("get_weather", "get_time")
    assert _weather_args_valid(uses[0].input) if uses[0].name == "get_weather" else set(uses[0].input) == {"zone"}
