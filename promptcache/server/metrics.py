"""Prometheus metrics on a per-app registry (tests build several apps in one process).

Engine-side numbers (tokens, blocks, evictions) are read from ``engine.stats()`` at scrape time, so
they are exact and never drift from what the engine reports in usage; HTTP-side numbers (requests
by status, time to first token) are recorded by the server as requests happen.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from promptcache.engine.api import AsyncEngine

# Paths counted by name; anything else is "other", so a scanner cannot blow up label cardinality.
API_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/messages/count_tokens",
             "/v1/models", "/health", "/metrics")
REPLICA_STATE = "promptcache_replica"  # scope["state"] key: the replica that served the request
REPLICA_HEADER = b"x-promptcache-replica"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_COUNTERS = {  # engine stats key -> (metric name without _total, help)
    "prompt_tokens": ("promptcache_prompt_tokens", "Prompt tokens of admitted requests"),
    "cached_tokens": ("promptcache_cached_tokens", "Prompt tokens reused from the prefix cache"),
    "computed_tokens": ("promptcache_computed_tokens", "Tokens run through the model (prefill and decode)"),
    "generated_tokens": ("promptcache_generated_tokens", "Tokens generated"),
    "cache_write_tokens": ("promptcache_cache_write_tokens", "Prompt tokens newly stored in the cache"),
    "blocks_evicted": ("promptcache_block_evictions", "Cached KV blocks evicted to make room"),
    "early_evictions": ("promptcache_early_evictions", "Evictions of blocks inside their retention"),
    "preemptions": ("promptcache_preemptions", "Running requests preempted for lack of KV blocks"),
    "requests_added": ("promptcache_engine_requests", "Requests admitted by the engine"),
}


_TIER_COUNTERS = {  # cache/tiers.py TierCounters field -> (metric name without _total, help)
    "hit_blocks": ("promptcache_tier_hit_blocks", "KV blocks loaded from a tier below memory"),
    "miss_blocks": ("promptcache_tier_miss_blocks", "KV blocks looked for below memory and not found"),
    "bytes_read": ("promptcache_tier_read_bytes", "Bytes read from a tier (loads)"),
    "bytes_written": ("promptcache_tier_written_bytes", "Bytes written to a tier"),
    "load_seconds": ("promptcache_tier_load_seconds", "Seconds spent loading (lookup, read, checksum)"),
    "loads": ("promptcache_tier_loads", "Runs of blocks loaded"),
    "errors": ("promptcache_tier_errors", "Tier calls that failed or timed out (each a miss or a dropped write)"),
    "corrupt": ("promptcache_tier_corrupt_objects", "Objects discarded on load: torn, truncated, flipped"),
    "dropped_writes": ("promptcache_tier_dropped_writes", "Writes dropped: queue full or tier down"),
    "skipped_slower": ("promptcache_tier_skipped_loads", "Loads skipped: recomputing was estimated faster"),
}
_TIER_GAUGES = {
    "queued_bytes": ("promptcache_tier_queue_bytes", "Bytes queued for a tier's writer"),
    "objects": ("promptcache_tier_objects", "Objects a tier holds (disk)"),
    "bytes_stored": ("promptcache_tier_stored_bytes", "Bytes a tier holds (disk)"),
    "discarded": ("promptcache_tier_discarded_at_startup", "Torn or corrupt objects deleted at start-up (disk)"),
    "evicted": ("promptcache_tier_evictions", "Objects evicted for capacity (disk)"),
    "circuit_open": ("promptcache_tier_circuit_open", "1 while a tier's circuit breaker is open (redis)"),
}


def _tier_metrics(tiers: dict[str, dict[str, float]], by_tier: dict[str, int]) -> Iterable[Metric]:
    if not tiers:
        return
    for key, (name, doc) in _TIER_COUNTERS.items():
        fam = CounterMetricFamily(name, doc, labels=["tier"])
        for tier, row in tiers.items():
            fam.add_metric([tier], row.get(key, 0))
        yield fam
    for key, (name, doc) in _TIER_GAUGES.items():
        gauge = GaugeMetricFamily(name, doc, labels=["tier"])
        for tier, row in tiers.items():
            if key in row:
                gauge.add_metric([tier], row[key])
        yield gauge
    fam = CounterMetricFamily("promptcache_tier_cached_tokens", "Cached prompt tokens that were loaded from a tier",
                              labels=["tier"])
    for tier in tiers:
        fam.add_metric([tier], by_tier.get(tier, 0))
    yield fam


class EngineCollector(Collector):
    def __init__(self, aengine: AsyncEngine) -> None:
        self.aengine = aengine

    def describe(self) -> Iterable[Metric]:
        return []  # values are only known at scrape time; nothing to pre-register

    def collect(self) -> Iterable[Metric]:
        snap = self.aengine.snapshot()
        stats, finished = snap.counters, snap.finished
        for key, (name, doc) in _COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=stats[key])
        prompt = stats["prompt_tokens"]
        hit_rate = stats["cached_tokens"] / prompt if prompt else 0.0
        yield GaugeMetricFamily("promptcache_prefix_cache_hit_rate",
                                "cached_tokens / prompt_tokens since start", value=hit_rate)
        blocks = GaugeMetricFamily("promptcache_kv_blocks", "KV blocks by state", labels=["state"])
        blocks.add_metric(["in_use"], stats["blocks_in_use"])
        blocks.add_metric(["cached"], stats["blocks_cached"])
        blocks.add_metric(["free"], stats["blocks_empty"])
        yield blocks
        yield GaugeMetricFamily("promptcache_kv_blocks_capacity", "KV blocks in the pool",
                                value=stats["blocks_total"])
        yield GaugeMetricFamily("promptcache_requests_running", "Requests running",
                                value=stats["requests_running"])
        yield GaugeMetricFamily("promptcache_requests_waiting", "Requests waiting",
                                value=stats["requests_waiting"])
        done = CounterMetricFamily("promptcache_requests_finished", "Finished requests by finish reason",
                                   labels=["reason"])
        for reason, count in sorted(finished.items()):
            done.add_metric([reason], count)
        yield done
        stops = CounterMetricFamily("promptcache_reuse_stops", "Admitted requests by why prefix reuse ended "
                                    "(reused_all, not_cached, evicted, expired, reset, in_flight)", labels=["reason"])
        for reason, count in sorted(snap.reuse_stops.items()):
            stops.add_metric([reason], count)
        yield stops
        yield from _tier_metrics(snap.tiers, snap.cached_tokens_by_tier)
        yield from _cluster_metrics(snap.replicas, snap.routing, snap.dropped_replicas)


def _cluster_metrics(replicas: dict[str, dict[str, int]], routing: dict[tuple[str, str], int],
                     dropped: dict[str, int]) -> Iterable[Metric]:
    """A cluster ingress' view (cluster/remote.py): per replica, and the routers' decisions."""
    if not replicas and not routing:
        return
    prompt = CounterMetricFamily("promptcache_replica_prompt_tokens", "Prompt tokens per replica", labels=["replica"])
    cached = CounterMetricFamily("promptcache_replica_cached_tokens", "Cached prompt tokens per replica",
                                 labels=["replica"])
    rate = GaugeMetricFamily("promptcache_replica_hit_rate", "cached_tokens / prompt_tokens per replica",
                             labels=["replica"])
    for name, row in sorted(replicas.items()):
        p, c = row.get("prompt_tokens", 0), row.get("cached_tokens", 0)
        prompt.add_metric([name], p)
        cached.add_metric([name], c)
        rate.add_metric([name], c / p if p else 0.0)
    yield from (prompt, cached, rate)
    decisions = CounterMetricFamily("promptcache_routing_decisions", "Requests routed, by replica and reason "
                                    "(affinity, least_cost, load_bound, hot_spread, fallback, round_robin, "
                                    "prefix_hash)", labels=["replica", "reason"])
    for (name, reason), count in sorted(routing.items()):
        decisions.add_metric([name, reason], count)
    yield decisions
    gone = CounterMetricFamily("promptcache_routing_replicas_dropped", "Replicas dropped from the routing index "
                               "(died: a call failed; removed: Serve replaced it)", labels=["reason"])
    for reason, count in sorted(dropped.items()):
        gone.add_metric([reason], count)
    yield gone


class ServerMetrics:
    def __init__(self, aengine: AsyncEngine) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineCollector(aengine))
        self.http_requests = Counter("promptcache_http_requests", "HTTP requests by endpoint and status",
                                     ["endpoint", "status"], registry=self.registry)
        self.ttft = Histogram("promptcache_time_to_first_token_seconds",
                              "Seconds from receiving a request to its first generated token",
                              ["endpoint"], buckets=TTFT_BUCKETS, registry=self.registry)
        # tenants come from the key file (bounded); without keys there is one, "-"
        self.cost = Counter("promptcache_cost_usd", "What finished requests cost at the price table (--prices)",
                            ["tenant"], registry=self.registry)
        self.cost_without_cache = Counter("promptcache_cost_without_cache_usd",
                                          "What they would have cost with nothing cached (minus cost_usd: saved)",
                                          ["tenant"], registry=self.registry)
        self.tenant_prompt = Counter("promptcache_tenant_prompt_tokens", "Prompt tokens of finished requests "
                                     "per tenant", ["tenant"], registry=self.registry)
        self.tenant_cached = Counter("promptcache_tenant_cached_tokens", "... of which reused from the cache "
                                     "(per-tenant hit rate: the ratio of the two)", ["tenant"], registry=self.registry)

    def observe_finish(self, tenant: str | None, prompt_tokens: int, cached_tokens: int, total_usd: float,
                       without_cache_usd: float) -> None:
        name = tenant or "-"
        self.tenant_prompt.labels(tenant=name).inc(prompt_tokens)
        self.tenant_cached.labels(tenant=name).inc(cached_tokens)
        self.cost.labels(tenant=name).inc(total_usd)
        self.cost_without_cache.labels(tenant=name).inc(without_cache_usd)

    def observe_ttft(self, endpoint: str, started: float) -> None:
        self.ttft.labels(endpoint=endpoint).observe(time.monotonic() - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StatusCounterMiddleware:
    """Pure ASGI middleware: counts each response's status (streams count when their headers go out)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        endpoint = path if path in API_PATHS else "other"
        counted = False

        async def send_counting(message: Message) -> None:
            nonlocal counted
            if message["type"] == "http.response.start" and not counted:
                counted = True
                self.metrics.http_requests.labels(endpoint=endpoint, status=str(message["status"])).inc()
                replica = (scope.get("state") or {}).get(REPLICA_STATE)
                if replica is not None:
                    message["headers"] = [*message.get("headers", []), (REPLICA_HEADER, str(replica).encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        except Exception:
            if not counted:  # the outermost error handler will answer 500
                self.metrics.http_requests.labels(endpoint=endpoint, status="500").inc()
            raise

