"""Streaming under load and clients that hang up: every block comes back, the pool stays consistent."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI, OpenAI
from test_server_harness import MODEL, Server, nonce, text_of_tokens, wait_until


def _idle(server: Server) -> bool:
    stats = server.stats()
    return stats["blocks_in_use"] == 0 and stats["requests_running"] == 0 and stats["requests_waiting"] == 0


def _aborted(server: Server) -> int:
    return server.aengine.snapshot().finished.get("abort", 0)


def test_disconnect_mid_stream_frees_every_block(server: Server) -> None:
    aborted_before = _aborted(server)
    body = {"model": MODEL, "messages": [{"role": "user", "content": nonce()}], "max_tokens": 3000,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in received)
        assert server.stats()["blocks_in_use"] > 0  # still generating while we hold the stream
    # the connection is closed: the server must notice, abort, and give the blocks back
    assert wait_until(lambda: _idle(server), timeout_s=10), server.stats()
    server.check_integrity()
    assert _aborted(server) == aborted_before + 1


def test_disconnect_while_waiting_for_a_plain_response(server: Server) -> None:
    aborted_before = _aborted(server)
    body = {"model": MODEL, "max_tokens": 3000, "messages": [{"role": "user", "content": nonce()}],
            "ignore_eos": True}  # it cannot finish by chance before the client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/messages", json=body, timeout=httpx.Timeout(30, read=0.5))
    assert wait_until(lambda: _idle(server), timeout_s=10), server.stats()
    server.check_integrity()
    assert _aborted(server) == aborted_before + 1


async def _openai_stream(client: AsyncOpenAI, messages: list[Any]) -> tuple[str, Any, str | None]:
    stream = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    text, usage, finish = "", None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, usage, finish


async def _anthropic_stream(client: AsyncAnthropic, system: str, question: str) -> tuple[str, Any]:
    async with client.messages.stream(model=MODEL, max_tokens=8, system=system, extra_body={"temperature": 0},
                                      messages=[{"role": "user", "content": question}]) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_message()
    return "".join(b.text for b in final.content if b.type == "text"), final.usage


def test_sixteen_concurrent_streaming_clients(server: Server) -> None:
    tok = server.engine.tokenizer
    system = text_of_tokens(tok, 300, nonce())
    questions = [f"Question number {i}: what comes next?" for i in range(16)]
    chats = [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in questions]

    async def run_all() -> list[Any]:
        oai = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        ant = AsyncAnthropic(base_url=server.url, api_key="x", max_retries=0)
        jobs = [_openai_stream(oai, chats[i]) if i % 2 == 0 else _anthropic_stream(ant, system, questions[i])
                for i in range(16)]
        return list(await asyncio.gather(*jobs))

    results = asyncio.run(run_all())
    sync = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    for i, result in enumerate(results):
        n_prompt = len(tok.apply_chat_template(chats[i]))
        if i % 2 == 0:
            text, usage, finish = result
            assert finish == "length" and usage.completion_tokens == 8 and usage.prompt_tokens == n_prompt
        else:
            text, usage = result
            assert usage.output_tokens == 8
            assert usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens == n_prompt
        # the same greedy text as the request alone gives (batching must not change the answer)
        alone = sync.chat.completions.create(model=MODEL, messages=chats[i], max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True})
        assert text == alone.choices[0].message.content
    assert wait_until(lambda: _idle(server), timeout_s=5)
    server.check_integrity()
