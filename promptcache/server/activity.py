"""What the dashboard shows: recent requests, hit rate over time, per-tenant totals, recent misses.

Recorded by every dialect when a request finishes (``misses.on_finish``) and when a miss is
diagnosed (``misses.explain``); read by ``dashboard.py``. Bounded in every dimension (events,
buckets, misses; tenants come from the key file, or there is one), thread-safe (requests finish on
the event loop, diagnoses run in worker threads). Pure Python: no engine, no tensors.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Any

OPEN_TENANT = "-"  # the single tenant of a server without API keys, as metrics name it
MAX_TENANTS = 4096  # beyond this the least recently active tenant's totals give way


@dataclass(frozen=True)
class RequestEvent:
    t: float  # wall-clock seconds when it finished
    id: str
    tenant: str
    endpoint: str
    prompt: int
    cached: int
    generated: int
    ttft_ms: float
    reason: str  # why reuse ended (the engine's reuse_stop reason)
    cost_usd: float
    saved_usd: float
    by_tier: dict[str, int] = field(default_factory=dict)

    @property
    def computed(self) -> int:
        return self.prompt - self.cached


@dataclass
class TenantTotals:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    cost_usd: float = 0.0
    saved_usd: float = 0.0

    def add(self, e: RequestEvent) -> None:
        self.requests += 1
        self.prompt_tokens += e.prompt
        self.cached_tokens += e.cached
        self.generated_tokens += e.generated
        self.cost_usd += e.cost_usd
        self.saved_usd += e.saved_usd

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["hit_rate"] = self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        return out


class ActivityLog:
    """``max_events`` recent requests, ``window_s`` of ``bucket_s`` buckets of prompt and cached
    tokens per tenant, totals per tenant since start, ``max_misses`` recent miss diagnoses."""

    def __init__(self, max_events: int = 200, bucket_s: float = 2.0, window_s: float = 600.0,
                 max_misses: int = 20, diagnoses_per_s: float = 2.0, diagnosis_burst: int = 10) -> None:
        if bucket_s <= 0 or window_s < bucket_s:
            raise ValueError("need 0 < bucket_s <= window_s")
        self.bucket_s, self.window_s = bucket_s, window_s
        self.started = time.time()
        self.diagnoses_per_s, self.diagnosis_burst = diagnoses_per_s, diagnosis_burst
        self._diagnosis_budget, self._budget_at = float(diagnosis_burst), time.monotonic()
        self._events: deque[RequestEvent] = deque(maxlen=max_events)
        self._misses: deque[dict[str, Any]] = deque(maxlen=max_misses)
        self._buckets: OrderedDict[int, dict[str, list[int]]] = OrderedDict()  # bucket -> tenant -> [prompt, cached]
        self._tenants: OrderedDict[str, TenantTotals] = OrderedDict()
        self.version = 0  # bumped on every change: the event stream sends a state only when it moved
        self._versions: dict[str, int] = {}  # ... and per tenant (a tenant never learns others' pace)
        self._lock = threading.Lock()

    def record(self, e: RequestEvent) -> None:
        with self._lock:
            self._events.append(e)
            totals = self._tenants.pop(e.tenant, None) or TenantTotals()
            totals.add(e)
            self._tenants[e.tenant] = totals  # most recently active last
            while len(self._tenants) > MAX_TENANTS:
                self._tenants.popitem(last=False)
            bucket = int(e.t // self.bucket_s)
            row = self._buckets.setdefault(bucket, {}).setdefault(e.tenant, [0, 0])
            row[0] += e.prompt
            row[1] += e.cached
            self._prune(e.t)
            self._bump(e.tenant)

    def _bump(self, tenant: str) -> None:  # with the lock held
        self.version += 1
        self._versions[tenant] = self._versions.get(tenant, 0) + 1
        while len(self._versions) > MAX_TENANTS:
            del self._versions[next(iter(self._versions))]

    def version_of(self, tenant: str | None) -> int:
        """What changed: everything (None), or one tenant's part."""
        with self._lock:
            return self.version if tenant is None else self._versions.get(tenant, 0)

    def _prune(self, now: float) -> None:  # with the lock held
        oldest = int((now - self.window_s) // self.bucket_s)
        while self._buckets and next(iter(self._buckets)) < oldest:
            self._buckets.popitem(last=False)

    def should_diagnose(self, computed_tokens: int, block_size: int) -> bool:
        """Whether to diagnose a request nobody asked about, for the dashboard: it computed at least
        a whole block, and the budget allows (``diagnoses_per_s`` on average, bursts of
        ``diagnosis_burst``: finding the closest earlier prompt costs CPU)."""
        if computed_tokens < block_size:
            return False
        with self._lock:
            now = time.monotonic()
            self._diagnosis_budget = min(float(self.diagnosis_burst),
                                         self._diagnosis_budget + (now - self._budget_at) * self.diagnoses_per_s)
            self._budget_at = now
            if self._diagnosis_budget < 1.0:
                return False
            self._diagnosis_budget -= 1.0
            return True

    def note_diagnosis(self, tenant: str | None, request_id: str, diagnosis: dict[str, Any]) -> None:
        """Keep a diagnosis that explains lost reuse: tokens an earlier request left that this one
        did not reuse (a divergence, an eviction, an expiry). Cold prompts with nothing similar
        before them are not misses to explain."""
        if diagnosis.get("compared_with") is None or not diagnosis.get("missed_tokens"):
            return
        with self._lock:
            self._misses.append({"t": time.time(), "id": request_id, "tenant": tenant or OPEN_TENANT,
                                 **diagnosis})
            self._bump(tenant or OPEN_TENANT)

    def view(self, tenant: str | None = None) -> dict[str, Any]:
        """Everything, or (``tenant`` given) only that tenant's requests, totals and misses."""
        now = time.time()
        with self._lock:
            self._prune(now)
            events = [e for e in self._events if tenant is None or e.tenant == tenant]
            misses = [m for m in self._misses if tenant is None or m["tenant"] == tenant]
            tenants = {name: t.as_dict() for name, t in self._tenants.items() if tenant is None or name == tenant}
            series = []
            for bucket, rows in self._buckets.items():
                prompt = sum(r[0] for name, r in rows.items() if tenant is None or name == tenant)
                cached = sum(r[1] for name, r in rows.items() if tenant is None or name == tenant)
                if prompt:
                    series.append({"t": bucket * self.bucket_s, "prompt_tokens": prompt, "cached_tokens": cached})
            version = self.version if tenant is None else self._versions.get(tenant, 0)
        prompt = sum(t["prompt_tokens"] for t in tenants.values())
        cached = sum(t["cached_tokens"] for t in tenants.values())
        return {
            "version": version,
            "now": now,
            "started": self.started,
            "bucket_s": self.bucket_s,
            "totals": {
                "requests": sum(t["requests"] for t in tenants.values()),
                "prompt_tokens": prompt,
                "cached_tokens": cached,
                "hit_rate": cached / prompt if prompt else 0.0,
                "cost_usd": sum(t["cost_usd"] for t in tenants.values()),
                "saved_usd": sum(t["saved_usd"] for t in tenants.values()),
            },
            "series": series,
            "requests": [{**asdict(e), "computed": e.computed} for e in reversed(events)],
            "tenants": tenants,
            "misses": list(reversed(misses)),
        }
