"""What a cluster ingress keeps between replica reports, without Ray running: sums that never go
backwards when a replica goes away, shared-store gauges counted once, errors that cross processes."""

from __future__ import annotations

import pickle

from promptcache.cluster.remote import RemoteEngine
from promptcache.cluster.shared import CLUSTER
from promptcache.engine.api import EngineOverloaded


def _row(name: str, prompt: int, cached: int, objects: int) -> dict:
    return {"replica": name, "counters": {"prompt_tokens": prompt, "cached_tokens": cached, "blocks_total": 64,
                                          "requests_running": 1},
            "finished": {"length": 2}, "reuse_stops": {}, "cached_tokens_by_tier": {"disk": 16},
            "tiers": {"disk": {"hit_blocks": 1, "objects": objects, "bytes_stored": 10 * objects}}}


def test_counters_never_go_backwards_and_shared_gauges_are_not_summed() -> None:
    with CLUSTER.lock:
        saved = (dict(CLUSTER.stats), dict(CLUSTER.retired))
        CLUSTER.stats.clear()
        CLUSTER.retired.clear()
        CLUSTER.stats.update({"a": _row("a", 100, 40, 7), "b": _row("b", 50, 10, 7)})
    try:
        before = RemoteEngine.snapshot(None)  # type: ignore[arg-type]  # it reads only the shared state
        assert before.counters["prompt_tokens"] == 150 and before.finished == {"length": 4}
        assert before.tiers["disk"]["objects"] == 7 and before.tiers["disk"]["hit_blocks"] == 2  # one directory
        with CLUSTER.lock:  # b dies: what it counted stays counted
            CLUSTER.retire(CLUSTER.stats.pop("b"))
        after = RemoteEngine.snapshot(None)  # type: ignore[arg-type]
        assert after.counters["prompt_tokens"] == 150 and after.counters["cached_tokens"] == 50
        assert after.counters["requests_running"] == 1 and after.counters["blocks_total"] == 64  # gauges: live only
        assert after.finished == {"length": 4} and after.cached_tokens_by_tier == {"disk": 32}
        assert set(after.replicas) == {"a"}
    finally:
        with CLUSTER.lock:
            CLUSTER.stats.clear()
            CLUSTER.stats.update(saved[0])
            CLUSTER.retired.clear()
            CLUSTER.retired.update(saved[1])


def test_an_overloaded_replicas_error_reaches_the_ingress_intact() -> None:
    e = pickle.loads(pickle.dumps(EngineOverloaded(3)))
    assert isinstance(e, EngineOverloaded) and e.retry_after_s == 3
    assert str(e) == "the server is overloaded; retry after 3 s"
