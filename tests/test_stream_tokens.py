"""One streamed chunk per generated token, in every dialect, even for tokens whose text is still
empty (an incomplete UTF-8 sequence, a token that decodes to nothing): a client's first chunk is
the first token. ``return_token_ids`` (vLLM) / ``return_tokens`` (llama.cpp) carry the ids.

Tokens without text are forced with ``logit_bias`` on ``<|im_start|>`` (id 1), a special token
the detokenizer drops: every one of them is a chunk of empty text."""

from __future__ import annotations

import json

import httpx
from test_server_harness import MODEL, Server, nonce

N = 48


def events(server: Server, path: str, body: dict, headers: dict | None = None) -> list[dict]:
    out = []
    with httpx.stream("POST", f"{server.url}{path}", json=body, headers=headers or {}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


def test_completions_stream_one_chunk_per_token_with_ids(server: Server) -> None:
    prompt = nonce()
    body = {"model": MODEL, "prompt": prompt, "max_tokens": N, "ignore_eos": True, "temperature": 0}
    plain = httpx.post(f"{server.url}/v1/completions", json={**body, "return_token_ids": True}, timeout=60).json()
    ids = plain["choices"][0]["token_ids"]
    assert len(ids) == N and plain["prompt_token_ids"] and plain["usage"]["prompt_tokens"] == len(
        plain["prompt_token_ids"])
    chunks = [c for c in events(server, "/v1/completions", {**body, "stream": True, "return_token_ids": True})
              if c.get("choices")]
    assert len(chunks) == N  # one per token, the last with the finish reason
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == ids
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[0]["prompt_token_ids"] == plain["prompt_token_ids"] and "prompt_token_ids" not in chunks[1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    llama = [c for c in events(server, "/v1/completions", {**body, "stream": True, "return_tokens": True})
             if c.get("choices")]
    assert [t for c in llama for t in c["choices"][0]["token_ids"]] == ids
    without = [c for c in events(server, "/v1/completions", {**body, "stream": True}) if c.get("choices")]
    assert len(without) == N and "token_ids" not in without[0]["choices"][0]


def test_tokens_without_text_are_chunks_too(server: Server) -> None:
    body = {"model": MODEL, "prompt": nonce(), "max_tokens": 12, "ignore_eos": True, "temperature": 0,
            "stream": True, "return_token_ids": True, "logit_bias": {"1": 100}}
    chunks = [c for c in events(server, "/v1/completions", body) if c.get("choices")]
    assert [c["choices"][0]["token_ids"] for c in chunks] == [[1]] * 12
    assert all(c["choices"][0]["text"] == "" for c in chunks)
    chat = events(server, "/v1/chat/completions", {**{k: v for k, v in body.items() if k != "prompt"},
                                                     "messages": [{"role": "user", "content": nonce()}]})
    assert len(chat) == 1 + 12 + 1 and all(c["choices"][0]["delta"].get("content") == "" for c in chat[1:-1])


def test_chat_stream_one_chunk_per_token(server: Server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": nonce()}], "max_tokens": N,
            "ignore_eos": True, "temperature": 0, "stream": True, "return_token_ids": True}
    chunks = events(server, "/v1/chat/completions", body)
    role, tokens, finish = chunks[0], chunks[1:-1], chunks[-1]
    assert role["choices"][0]["delta"]["role"] == "assistant" and "prompt_token_ids" in role
    assert len(tokens) == N and all("content" in c["choices"][0]["delta"] for c in tokens)
    assert sum(len(c["choices"][0]["token_ids"]) for c in tokens) == N
    assert finish["choices"][0]["finish_reason"] == "length"


def test_anthropic_gemini_and_responses_streams_have_an_event_per_token(server: Server) -> None:
    anthropic = events(server, "/v1/messages", {"model": MODEL, "max_tokens": N, "stream": True,
                                                "messages": [{"role": "user", "content": nonce()}]},
                       headers={"anthropic-version": "2023-06-01"})
    per_token = [e for e in anthropic if e["type"] in ("content_block_delta", "ping")]
    final = next(e for e in anthropic if e["type"] == "message_delta")
    generated = final["usage"]["output_tokens"]
    # one event per token but the last, whose text (if any) closes the block, plus message_start's ping
    assert generated - 1 <= len(per_token) - 1 <= generated, (len(per_token), generated)

    gemini = events(server, f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse",
                    {"contents": [{"role": "user", "parts": [{"text": nonce()}]}],
                     "generationConfig": {"maxOutputTokens": N}})
    assert len(gemini) == gemini[-1]["usageMetadata"]["candidatesTokenCount"]

    responses = events(server, "/v1/responses", {"model": MODEL, "input": nonce(), "max_output_tokens": N,
                                                 "stream": True})
    deltas = [e for e in responses if e["type"] == "response.output_text.delta"]
    done = next(e for e in responses if e["type"] in ("response.completed", "response.incomplete"))
    generated = done["response"]["usage"]["output_tokens"]
    assert generated - 1 <= len(deltas) <= generated
