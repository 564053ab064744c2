"""promptcache on Ray Serve, for real: one ingress and 2 engine replicas of a tiny random model
(Ray local mode, half a CPU and one torch thread each), sharing a real redis-server, driven over
HTTP with the OpenAI SDK. Conversations stay on the replica that holds them; a prompt resent to
another replica hits through Redis; killing a replica fails no later request and moves its
traffic. The policy itself is tested exactly, without Ray, in test_routing_policy.py."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from redis_server import RedisServer, free_port
from test_server_harness import MODEL, nonce, text_of_tokens

from promptcache.model.shapes import random_checkpoint
from promptcache.tokenizer import Tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPLICA = "x-promptcache-replica"
CONVERSATIONS = 12


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[str]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from promptcache.cluster import serve_app
    from promptcache.engine.config import EngineConfig

    redis = RedisServer(tmp_path_factory.mktemp("redis")).start()
    config = EngineConfig.of(model=MODEL, dtype="float32", device="cpu", num_blocks=256, max_model_len=2048,
                             redis_url=redis.url, tier_skip_slower=False)
    app = serve_app.build(config, replicas=2, app_options={"default_max_tokens": 8}, cpus_per_replica=0.5,
                          threads_per_replica=1)
    port = free_port()
    serve_app.start_local(app, "127.0.0.1", port, num_cpus=2)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve_app.stop_local()
        assert not ray.is_initialized()
        redis.kill()


def ask(url: str, system: str, turns: list[tuple[str, str]], question: str) -> tuple[str, int, int]:
    """(the replica that served it, prompt tokens, cached tokens) of one chat request."""
    messages = [{"role": "system", "content": system}]
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": question})
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=4,
                                                           temperature=0)
    body = raw.parse()
    assert body.usage is not None and body.usage.prompt_tokens_details is not None
    return raw.headers[REPLICA], body.usage.prompt_tokens, body.usage.prompt_tokens_details.cached_tokens or 0


def wait_for_stats(seconds: float = 1.5) -> None:
    time.sleep(seconds)  # replicas report what they hold every 0.5 s (the router also records optimistically)


def metric(url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}


def test_a_conversation_stays_on_the_replica_that_holds_it(cluster: str) -> None:
    tok = Tokenizer(random_checkpoint("tiny"))
    served: dict[int, set[str]] = {}
    for conv in range(CONVERSATIONS):
        system = text_of_tokens(tok, 200, nonce())  # prose of a known size, distinct per conversation
        turns: list[tuple[str, str]] = []
        replicas = set()
        for turn in range(3):
            replica, prompt, cached = ask(cluster, system, turns, f"question {turn}")
            replicas.add(replica)
            if turn:
                assert cached >= 192, (conv, turn, prompt, cached)  # the system prompt and earlier turns
            turns.append((f"question {turn}", "an answer"))
        served[conv] = replicas
    assert all(len(r) == 1 for r in served.values()), served  # every turn where the first one ran
    # and distinct conversations spread over both: one after another, nothing but the prefix's hash
    # tells the replicas apart (rendezvous hashing with Ray's random replica ids: all on one replica
    # has a chance of 2 / 2**12 per run)
    assert len(set().union(*served.values())) == 2
    decisions = metric(cluster, "promptcache_routing_decisions_total")
    assert sum(v for k, v in decisions.items() if ("reason", "affinity") in k) >= 2 * CONVERSATIONS
    wait_for_stats()
    rates = metric(cluster, "promptcache_replica_hit_rate")
    assert len(rates) == 2 and all(v > 0 for v in rates.values()), rates


def test_killing_a_replica_fails_no_later_request_and_a_resend_hits_through_redis(cluster: str) -> None:
    import ray

    tok = Tokenizer(random_checkpoint("tiny"))
    system = text_of_tokens(tok, 300, nonce())
    first, prompt, cached = ask(cluster, system, [], "before the kill")
    assert cached == 0
    wait_for_stats()
    assert ask(cluster, system, [], "before the kill")[0] == first  # affinity
    time.sleep(1.0)  # the replica's writer has put the prefix's blocks in Redis
    ray.kill(ray.get_actor(f"SERVE_REPLICA::promptcache#Engine#{first}", namespace="serve"))
    after = [ask(cluster, system, [], "after the kill") for _ in range(4)]  # none of these may fail
    assert all(replica != first for replica, _, _ in after)  # its traffic moved
    replica, prompt, cached = after[0]
    assert cached >= 288, (prompt, cached)  # the other replica loaded the prefix from Redis
    wait_for_stats()
    tiers = metric(cluster, "promptcache_tier_cached_tokens_total")
    assert tiers.get((("tier", "redis"),), 0) >= 288
    dropped = metric(cluster, "promptcache_routing_replicas_dropped_total")
    assert sum(dropped.values()) >= 1


def test_the_cluster_serves_the_dashboard_and_refuses_pins_clearly(cluster: str) -> None:
    state = httpx.get(f"{cluster}/dashboard/api/state", timeout=10).json()
    assert state["totals"]["requests"] >= 1 and state["engine"]["blocks"]["total"] >= 256
    r = httpx.post(f"{cluster}/v1beta/cachedContents", timeout=30, json={
        "model": f"models/{MODEL}", "contents": [{"role": "user", "parts": [{"text": "x " * 400}]}]})
    assert r.status_code == 501 and "--replicas" in r.json()["error"]["message"]
