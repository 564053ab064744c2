"""Failures: the engine failing mid-request, a full queue, a queued client hanging up, a stopped engine.

The engine failure is real, not simulated: the next input token of every running request is set
outside the vocabulary, so the model's embedding lookup raises inside a real step.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import anthropic
import httpx
import openai
import pytest
from test_server_harness import MODEL, Server, nonce, running, serve, tiny_engine, wait_until

from promptcache.engine.llm_engine import LLMEngine

ENGINE_FAILED = "the model engine failed while serving this request; please retry later"
LONG = {"max_tokens": 3000, "extra_body": {"ignore_eos": True}}  # runs for seconds on the tiny model


def _poison_running(engine: LLMEngine) -> int:
    vocab = engine.runner.loaded.arch.vocab_size
    for req in engine.scheduler.running:
        req.all_token_ids[-1] = vocab + 1  # the token the next step feeds the model
    return len(engine.scheduler.running)


def _messages() -> list[Any]:
    return [{"role": "user", "content": nonce()}]


async def _fail_four_requests(srv: Server) -> list[Any]:
    """Two streams and two plain requests (both dialects) running when the engine step fails."""
    oai = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
    ant = anthropic.AsyncAnthropic(base_url=srv.url, api_key="x", max_retries=0)
    streaming = asyncio.Event()
    num_streaming = 0

    async def openai_stream() -> Exception:
        nonlocal num_streaming
        stream = await oai.chat.completions.create(model=MODEL, messages=_messages(), stream=True, **LONG)
        with pytest.raises(openai.APIError) as info:
            async for _ in stream:
                if not streaming.is_set():
                    num_streaming += 1
                    streaming.set()
        return info.value

    async def anthropic_stream() -> Exception:
        nonlocal num_streaming
        with pytest.raises(anthropic.APIStatusError) as info:
            async with ant.messages.stream(model=MODEL, messages=_messages(), **LONG) as stream:
                num_streaming += 1
                async for _ in stream:
                    pass
        return info.value

    async def poison() -> int:
        await streaming.wait()
        while num_streaming < 2 or (await asyncio.to_thread(srv.stats))["requests_running"] < 4:
            await asyncio.sleep(0.01)
        return await asyncio.to_thread(srv.aengine.call, _poison_running)

    jobs = [openai_stream(), anthropic_stream(), oai.chat.completions.create(model=MODEL, messages=_messages(), **LONG),
            ant.messages.create(model=MODEL, messages=_messages(), **LONG)]
    return list(await asyncio.gather(poison(), *jobs, return_exceptions=True))


def test_engine_failure_is_reported_in_each_dialect() -> None:
    with running(tiny_engine()) as aengine, serve(aengine) as srv:
        _check_failure_reports(srv)


def _check_failure_reports(server: Server) -> None:
    poisoned, oai_stream, ant_stream, oai_plain, ant_plain = asyncio.run(_fail_four_requests(server))
    assert poisoned == 4
    openai_error = {"message": ENGINE_FAILED, "type": "server_error", "param": None, "code": None}
    anthropic_error = {"type": "error", "error": {"type": "api_error", "message": ENGINE_FAILED}}
    # streams: the 200 is out, so the error comes in-band (never a dropped connection)
    assert isinstance(oai_stream, openai.APIError) and oai_stream.body == openai_error
    assert isinstance(ant_stream, anthropic.APIStatusError) and ant_stream.body == anthropic_error
    # plain requests: 503 in the dialect's envelope; nothing of the internal exception leaks
    assert isinstance(oai_plain, openai.InternalServerError) and oai_plain.status_code == 503
    assert oai_plain.body == openai_error
    assert isinstance(ant_plain, anthropic.InternalServerError) and ant_plain.status_code == 503
    assert ant_plain.body == anthropic_error
    # the engine recovered: every block is back and the server answers again
    assert wait_until(lambda: server.stats()["blocks_in_use"] == 0)
    server.check_integrity()
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model=MODEL, messages=_messages(), max_tokens=2)
    assert r.usage is not None and r.usage.completion_tokens >= 1


def _send(srv: Server, body: dict[str, Any]) -> socket.socket:
    """A raw chat request whose answer is never read; closing the socket hangs up."""
    data = json.dumps(body).encode()
    host, port = srv.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def _aborted(srv: Server) -> int:
    return srv.aengine.snapshot().finished.get("abort", 0)


def test_full_queue_is_429_and_a_queued_client_can_hang_up() -> None:
    """One sequence at a time and one queue slot: a running request, a queued one, then 429s."""
    with running(tiny_engine(num_blocks=512, max_num_seqs=1), max_waiting=1) as aengine, serve(aengine) as srv:
        body = {"model": MODEL, "messages": _messages(), "max_tokens": 3000, "ignore_eos": True, "stream": True}
        running_sock = _send(srv, body)
        assert wait_until(lambda: srv.stats()["requests_running"] == 1)
        queued_sock = _send(srv, {**body, "messages": _messages()})
        assert wait_until(lambda: srv.stats()["requests_waiting"] == 1)
        with pytest.raises(openai.RateLimitError) as info:
            openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0).chat.completions.create(
                model=MODEL, messages=_messages(), max_tokens=1)
        assert int(info.value.response.headers["retry-after"]) >= 1
        assert isinstance(info.value.body, dict) and info.value.body["code"] == "rate_limit_exceeded"
        with pytest.raises(anthropic.RateLimitError) as ainfo:
            anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0).messages.create(
                model=MODEL, max_tokens=1, messages=_messages())
        assert int(ainfo.value.response.headers["retry-after"]) >= 1
        assert isinstance(ainfo.value.body, dict) and ainfo.value.body["error"]["type"] == "rate_limit_error"
        # the queued client hangs up: its request leaves the queue at once, holding no blocks
        aborted = _aborted(srv)
        queued_sock.close()
        assert wait_until(lambda: srv.stats()["requests_waiting"] == 0 and _aborted(srv) == aborted + 1)
        assert srv.stats()["requests_running"] == 1
        running_sock.close()
        assert wait_until(lambda: srv.stats()["blocks_in_use"] == 0 and srv.stats()["requests_running"] == 0)
        srv.check_integrity()


def test_health_is_503_once_the_engine_loop_stopped() -> None:
    with running(tiny_engine(num_blocks=64)) as aengine, serve(aengine) as srv:
        assert httpx.get(f"{srv.url}/health").status_code == 200
        aengine.shutdown()
        r = httpx.get(f"{srv.url}/health")
        assert r.status_code == 503 and r.json() == {"status": "error", "error": "the engine loop is not running"}


def test_a_trickled_body_gets_408_and_the_connection_is_freed():
    """200 connections sending a partial body were all still open after 60 s; now each gets its
    408 once ``body_timeout_s`` has passed, in the dialect's envelope, and the server still serves."""
    with running(tiny_engine()) as aengine, serve(aengine, body_timeout_s=1.0) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        socks = []
        for path in ("/v1/chat/completions", "/v1/messages") * 5:
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: 1000\r\n\r\n{{\"model\": ".encode())
            socks.append((path, s))
        started = time.monotonic()
        for path, s in socks:
            head, body = _read_response(s)
            s.close()
            assert head.startswith("HTTP/1.1 408"), head[:200]
            assert "connection: close" in head.lower()  # else uvicorn keeps reading the trickle
            if path == "/v1/messages":
                assert '"type":"timeout_error"' in body.replace(" ", "")
            else:
                assert "not received within 1 s" in body
        assert time.monotonic() - started < 8
        ok = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
        assert ok.status_code == 200


def _read_response(s: socket.socket) -> tuple[str, str]:
    """(status line and headers, body) of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return head.decode(), body.decode()
