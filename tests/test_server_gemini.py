"""The Gemini dialect through the official google-genai SDK against a real server (random:tiny):
models, generateContent (plain, streamed, function calls, JSON), countTokens, and explicit caches
as resources, pinned in memory while they live."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from google import genai
from google.genai import errors, types
from test_server_harness import KEYS, MODEL, Server, nonce, running, serve, text_of_tokens, tiny_engine

BS = 16


def gclient(url: str, key: str = "unused", api_version: str | None = None) -> genai.Client:
    options = types.HttpOptions(base_url=url, api_version=api_version, retry_options=types.HttpRetryOptions(attempts=1))
    return genai.Client(api_key=key, http_options=options)


@pytest.fixture(scope="module")
def client(server: Server) -> genai.Client:
    return gclient(server.url)


def test_models_are_listed_on_both_api_versions(server: Server, client: genai.Client) -> None:
    assert [m.name for m in client.models.list()] == [f"models/{MODEL}"]
    assert client.models.get(model=MODEL).name == f"models/{MODEL}"
    beta = gclient(server.url, api_version="v1beta")
    assert [m.name for m in beta.models.list()] == [f"models/{MODEL}"]
    # an OpenAI client on the same path still gets OpenAI's shape
    assert httpx.get(f"{server.url}/v1/models").json()["object"] == "list"


def test_generate_content_implicit_caching_and_streaming(server: Server, client: genai.Client) -> None:
    doc = text_of_tokens(server.engine.tokenizer, 300, nonce())
    config = types.GenerateContentConfig(max_output_tokens=6, temperature=0, system_instruction="Be brief.")
    first = client.models.generate_content(model=MODEL, contents=doc, config=config)
    assert first.usage_metadata is not None and not first.usage_metadata.cached_content_token_count
    assert first.candidates and first.candidates[0].finish_reason in (types.FinishReason.STOP,
                                                                       types.FinishReason.MAX_TOKENS)
    again = client.models.generate_content(model=MODEL, contents=doc + " More?", config=config)
    assert again.usage_metadata is not None
    assert (again.usage_metadata.cached_content_token_count or 0) >= 300 // BS * BS - BS  # implicit hit
    chunks = list(client.models.generate_content_stream(model=MODEL, contents=doc, config=config))
    assert "".join(c.text or "" for c in chunks) == first.text
    last = chunks[-1]
    assert last.usage_metadata is not None and last.usage_metadata.prompt_token_count == \
        first.usage_metadata.prompt_token_count
    count = client.models.count_tokens(model=MODEL, contents=doc)
    assert count.total_tokens is not None and count.total_tokens > 300


WEATHER = types.FunctionDeclaration(name="get_weather", description="Weather in a city", parameters={
    "type": "OBJECT", "properties": {"city": {"type": "STRING", "maxLength": 12}}, "required": ["city"]})


def test_function_calling_round_trip(client: genai.Client) -> None:
    tools = [types.Tool(function_declarations=[WEATHER])]
    forced = types.ToolConfig(function_calling_config=types.FunctionCallingConfig(mode="ANY"))
    r = client.models.generate_content(model=MODEL, contents=f"{nonce()} Weather in Paris?",
                                       config=types.GenerateContentConfig(tools=tools, tool_config=forced,
                                                                          max_output_tokens=60))
    calls = r.function_calls or []
    assert len(calls) == 1 and calls[0].name == "get_weather" and isinstance((calls[0].args or {}).get("city"), str)
    history = [types.Content(role="user", parts=[types.Part(text="Weather in Paris?")]),
               types.Content(role="model", parts=[types.Part(function_call=calls[0])]),
               types.Content(role="user", parts=[types.Part(function_response=types.FunctionResponse(
                   name="get_weather", response={"result": "sunny"}))])]
    follow = client.models.generate_content(model=MODEL, contents=history,
                                            config=types.GenerateContentConfig(tools=tools, max_output_tokens=4))
    assert follow.usage_metadata is not None and follow.usage_metadata.prompt_token_count


def test_json_output(client: genai.Client) -> None:
    r = client.models.generate_content(model=MODEL, contents="2+2?", config=types.GenerateContentConfig(
        response_mime_type="application/json", max_output_tokens=40,
        response_schema={"type": "OBJECT", "properties": {"answer": {"type": "STRING", "maxLength": 8}},
                         "required": ["answer"]}))
    answer = json.loads(r.text or "")
    assert set(answer) == {"answer"} and isinstance(answer["answer"], str) and len(answer["answer"]) <= 8


def _cache(client: genai.Client, server: Server, tokens: int, ttl: str = "300s", **kw: Any) -> Any:
    doc = text_of_tokens(server.engine.tokenizer, tokens, nonce())
    return client.caches.create(model=MODEL, config=types.CreateCachedContentConfig(
        contents=[doc], system_instruction="You answer questions about the document.", ttl=ttl, **kw))


def test_cached_contents_lifecycle(server: Server, client: genai.Client) -> None:
    cache = _cache(client, server, 400, display_name="doc")
    assert cache.name is not None and cache.name.startswith("cachedContents/") and cache.display_name == "doc"
    assert cache.usage_metadata is not None and (cache.usage_metadata.total_token_count or 0) > 400
    r = client.models.generate_content(model=MODEL, contents="What is it about?", config=types.GenerateContentConfig(
        cached_content=cache.name, max_output_tokens=4))
    assert r.usage_metadata is not None
    total = cache.usage_metadata.total_token_count or 0
    assert (r.usage_metadata.cached_content_token_count or 0) >= total // BS * BS
    got = client.caches.get(name=cache.name)
    assert got.name == cache.name and got.expire_time == cache.expire_time
    updated = client.caches.update(name=cache.name, config=types.UpdateCachedContentConfig(ttl="7200s"))
    assert updated.expire_time is not None and cache.expire_time is not None
    assert updated.expire_time > cache.expire_time
    client.caches.delete(name=cache.name)
    with pytest.raises(errors.ClientError) as e:
        client.caches.get(name=cache.name)
    assert e.value.code == 404 and e.value.status == "NOT_FOUND"
    server.check_integrity()


def test_listing_is_paged(server: Server, client: genai.Client) -> None:
    names = {_cache(client, server, 40).name for _ in range(3)}
    listed = [c.name for c in client.caches.list(config=types.ListCachedContentsConfig(page_size=2))]
    assert names <= set(listed)
    page = httpx.get(f"{server.url}/v1beta/cachedContents", params={"pageSize": 2}).json()
    assert len(page["cachedContents"]) == 2 and page["nextPageToken"]
    for name in names:
        client.caches.delete(name=name)


def test_errors_in_googles_envelope(server: Server, client: genai.Client) -> None:
    cache = _cache(client, server, 40)
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"cachedContent": "cachedContents/nope", "contents": [{"role": "user", "parts": [{"text": "q"}]}]}, 404,
         "NOT_FOUND"),
        ({"cachedContent": cache.name, "systemInstruction": {"parts": [{"text": "x"}]},
          "contents": [{"role": "user", "parts": [{"text": "q"}]}]}, 400, "INVALID_ARGUMENT"),
        ({"contents": [{"role": "user", "parts": [{"inlineData": {"mimeType": "image/png", "data": "AA=="}}]}]}, 400,
         "INVALID_ARGUMENT"),
        ({"contents": [{"role": "user", "parts": [{"text": "q"}]}], "generationConfig": {"candidateCount": 2}}, 400,
         "INVALID_ARGUMENT"),
        ({"contents": [{"role": "user", "parts": [{"text": "q"}]}], "bogus": 1}, 400, "INVALID_ARGUMENT"),
    ]
    for body, status, name in cases:
        r = httpx.post(f"{server.url}/v1beta/models/{MODEL}:generateContent", json=body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["code"] == status and err["status"] == name and err["message"], r.text
    r = httpx.post(f"{server.url}/v1beta/models/other:generateContent", json=cases[0][0])
    assert r.status_code == 404 and r.json()["error"]["status"] == "NOT_FOUND"
    r = httpx.patch(f"{server.url}/v1beta/{cache.name}", json={"displayName": "renamed"})
    assert r.status_code == 400 and r.json()["error"]["status"] == "INVALID_ARGUMENT"
    with pytest.raises(errors.ClientError):
        client.models.generate_content(model=MODEL, contents="q", config=types.GenerateContentConfig(
            cached_content=cache.name, tools=[types.Tool(function_declarations=[WEATHER])]))
    client.caches.delete(name=cache.name)


def test_a_cached_content_survives_a_full_pool_until_it_is_deleted() -> None:
    """A 64-block pool: the cached content's blocks are pinned through traffic that needs every
    other block; after delete, the same traffic evicts them."""
    with running(tiny_engine(num_blocks=64)) as aengine, serve(aengine) as srv:
        client = gclient(srv.url)
        doc = text_of_tokens(srv.engine.tokenizer, 300, nonce())
        cache = client.caches.create(model=MODEL, config=types.CreateCachedContentConfig(contents=[doc], ttl="600s"))
        pinned = srv.stats()["blocks_pinned"] * BS
        assert pinned >= 300 // BS * BS
        same = [types.Content(role="user", parts=[types.Part(text=doc)]),
                types.Content(role="user", parts=[types.Part(text="q")])]  # renders as cache + "q"

        def churn() -> None:
            for _ in range(4):  # each prompt needs most of the unpinned blocks
                filler = text_of_tokens(srv.engine.tokenizer, 560 - pinned, nonce())
                client.models.generate_content(model=MODEL, contents=filler,
                                               config=types.GenerateContentConfig(max_output_tokens=1))

        def reused(**config: Any) -> int:
            r = client.models.generate_content(model=MODEL, contents="q" if config else same,
                                               config=types.GenerateContentConfig(max_output_tokens=1, **config))
            return r.usage_metadata.cached_content_token_count or 0  # type: ignore[union-attr]

        evicted = srv.stats()["blocks_evicted"]
        churn()
        assert srv.stats()["blocks_evicted"] > evicted  # the pool was full ...
        assert reused(cached_content=cache.name) >= pinned  # ... and the pinned prefix stayed
        assert reused() >= pinned  # the same prompt sent without the cache hits it too (implicitly)
        client.caches.delete(name=cache.name)
        assert srv.stats()["blocks_pinned"] == 0
        churn()
        assert reused() < pinned  # unpinned: the traffic evicted it
        srv.check_integrity()


def test_pins_have_a_per_tenant_budget_and_expire() -> None:
    with running(tiny_engine(num_blocks=64)) as aengine, serve(aengine, api_keys=KEYS) as srv:
        acme, globex = gclient(srv.url, "sk-acme-0001"), gclient(srv.url, "sk-globex-0002")
        doc = text_of_tokens(srv.engine.tokenizer, 300, nonce())
        cache = acme.caches.create(model=MODEL, config=types.CreateCachedContentConfig(contents=[doc], ttl="600s"))
        with pytest.raises(errors.ClientError) as e:  # 512 tokens of pins per tenant (half of 64 blocks)
            acme.caches.create(model=MODEL, config=types.CreateCachedContentConfig(contents=[doc], ttl="600s"))
        assert e.value.status == "FAILED_PRECONDITION" and "budget" in (e.value.message or "")
        with pytest.raises(errors.ClientError) as e:  # another tenant's cache is not found
            globex.caches.get(name=cache.name or "")
        assert e.value.code == 404
        short = globex.caches.create(model=MODEL, config=types.CreateCachedContentConfig(contents=["tiny"], ttl="1s"))
        time.sleep(1.3)
        with pytest.raises(errors.ClientError):
            globex.models.generate_content(model=MODEL, contents="q", config=types.GenerateContentConfig(
                cached_content=short.name, max_output_tokens=1))
        r = httpx.get(f"{srv.url}/v1beta/models", headers={"x-goog-api-key": "wrong"})
        assert r.status_code == 401
        assert r.json()["error"]["message"] == "API key not valid. Please pass a valid API key."
        assert httpx.get(f"{srv.url}/v1beta/models", params={"key": "sk-acme-0001"}).status_code == 200
        assert httpx.get(f"{srv.url}/v1beta/models").status_code == 401


def test_the_pin_budget_is_a_server_flag() -> None:
    with running(tiny_engine(num_blocks=64)) as aengine, serve(aengine, max_pinned_tokens=100) as srv:
        client = gclient(srv.url)
        with pytest.raises(errors.ClientError) as e:
            client.caches.create(model=MODEL, config=types.CreateCachedContentConfig(
                contents=[text_of_tokens(srv.engine.tokenizer, 200, nonce())]))
        assert e.value.code == 400 and e.value.status == "FAILED_PRECONDITION"
        assert "budget of 100 pinned tokens" in (e.value.message or "")
        assert srv.stats()["blocks_pinned"] == 0


def test_pins_never_leave_a_request_unable_to_run() -> None:
    """Review finding: a request that fit the pool but not its unpinned part waited for good (and
    everything behind it); concurrent creates all passed the budget check."""
    import concurrent.futures

    with running(tiny_engine(num_blocks=64)) as aengine, serve(aengine) as srv:
        client = gclient(srv.url)
        client.caches.create(model=MODEL, config=types.CreateCachedContentConfig(
            contents=[text_of_tokens(srv.engine.tokenizer, 460, nonce())], ttl="600s"))
        pinned = srv.stats()["blocks_pinned"]
        assert pinned >= 28
        too_big = {"contents": [{"role": "user", "parts": [{"text": text_of_tokens(srv.engine.tokenizer, 300,
                                                                                      nonce())}]}],
                   "generationConfig": {"maxOutputTokens": 300}}
        r = httpx.post(f"{srv.url}/v1beta/models/{MODEL}:generateContent", json=too_big, timeout=60)
        assert r.status_code == 400 and "are not pinned by cached contents" in r.json()["error"]["message"]
        small = client.models.generate_content(model=MODEL, contents="hi", config=types.GenerateContentConfig(
            max_output_tokens=2))  # the queue is not stuck behind it
        assert small.usage_metadata is not None

    with running(tiny_engine(num_blocks=128)) as aengine, serve(aengine, max_pinned_tokens=1024) as srv:
        client = gclient(srv.url)

        def create(i: int) -> int:
            try:
                client.caches.create(model=MODEL, config=types.CreateCachedContentConfig(
                    contents=[text_of_tokens(srv.engine.tokenizer, 400, nonce())], ttl="600s"))
                return 200
            except errors.ClientError as e:
                return e.code

        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            codes = list(pool.map(create, range(5)))
        assert codes.count(200) == 2 and codes.count(400) == 3, codes  # 2 x ~420 tokens fit 1024
        assert srv.stats()["blocks_pinned"] <= 1024 // BS
        srv.check_integrity()


def test_gemini_bodies_are_bounded_and_urls_keys_are_gemini_only() -> None:
    with running(tiny_engine()) as aengine, serve(aengine, api_keys=KEYS, max_request_bytes=4000) as srv:
        body = {"contents": [{"role": "user", "parts": [{"text": "x" * 20000}]}]}
        r = httpx.post(f"{srv.url}/v1beta/models/{MODEL}:countTokens", json=body, params={"key": "sk-acme-0001"})
        assert r.status_code == 413 and r.json()["error"]["status"] == "INVALID_ARGUMENT"
        chat = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=chat, params={"key": "sk-acme-0001"})
        assert r.status_code == 401  # a key in an OpenAI URL is not a key (it would end up in access logs)
        r = httpx.get(f"{srv.url}/v1beta/cachedContents", params={"key": "sk-acme-0001", "pageToken": "LTU="})
        assert r.status_code == 400 and "pageToken" in r.json()["error"]["message"]
        r = httpx.post(f"{srv.url}/v1/responses", json={"model": MODEL, "input": []},
                       headers={"Authorization": "Bearer sk-acme-0001"})
        assert r.status_code == 400


def test_count_tokens_reports_what_the_pin_holds(server: Server, client: genai.Client) -> None:
    cache = _cache(client, server, 200)
    r = httpx.post(f"{server.url}/v1beta/models/{MODEL}:countTokens", json={"generateContentRequest": {
        "model": f"models/{MODEL}", "cachedContent": cache.name,
        "contents": [{"role": "user", "parts": [{"text": "q"}]}]}}).json()
    total = cache.usage_metadata.total_token_count or 0  # type: ignore[union-attr]
    assert total // BS * BS - BS <= r["cachedContentTokenCount"] <= total  # whole blocks a request reuses
    used = client.models.generate_content(model=MODEL, contents="q", config=types.GenerateContentConfig(
        cached_content=cache.name, max_output_tokens=1)).usage_metadata
    assert used is not None and (used.cached_content_token_count or 0) >= r["cachedContentTokenCount"]
    client.caches.delete(name=cache.name)
