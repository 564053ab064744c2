"""The Redis tier: one value per block, shared by every server pointed at the same Redis.

Each value is the same self-describing object the disk stores (cache/tier_format.py), so a reader
verifies what another process wrote. Keys are ``<prefix><block hash hex>``: the hash is chained
from the model namespace and the tenant, so two models or tenants never share a key.

Every value is ``SET`` with a TTL: ``max(default_ttl_s, the block's retention)``; a load or a
touch refreshes it (``EXPIRE``). Every call has bounded socket timeouts and goes through a circuit
breaker: a slow or dead Redis costs misses and counters, never a stalled or failed request.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis

from promptcache.cache.hashing import BlockHash
from promptcache.cache.tiers import TierError

T = TypeVar("T")
KEY_PREFIX = "promptcache:kv:"


class CircuitBreaker:
    """After ``failures`` consecutive failures the circuit opens: calls fail at once for
    ``cooldown_s``; then one call is let through, and its success closes the circuit again."""

    def __init__(self, failures: int = 3, cooldown_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.failures, self.cooldown_s, self.clock = failures, cooldown_s, clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            if self._opened_at is None:
                return True
            if self.clock() - self._opened_at >= self.cooldown_s:
                self._opened_at = self.clock()  # half-open: this caller probes, the others wait
                return True
            return False

    def success(self) -> None:
        with self._lock:
            self._consecutive = 0
            self._opened_at = None

    def failure(self) -> None:
        with self._lock:
            self._consecutive += 1
            if self._consecutive >= self.failures:
                self._opened_at = self.clock()

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None


class RedisTier:
    name = "redis"

    def __init__(self, url: str, default_ttl_s: float = 3600.0, timeout_s: float = 0.25,
                 key_prefix: str = KEY_PREFIX, cooldown_s: float = 5.0) -> None:
        if not default_ttl_s > 0:
            raise ValueError("the Redis ttl must be > 0 seconds")
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                               retry_on_timeout=False)
        except ValueError as e:
            raise ValueError(f"invalid --redis-url {url!r}: {e}") from e
        self.url = url
        self.default_ttl_s = default_ttl_s
        self.prefix = key_prefix
        self.breaker = CircuitBreaker(failures=3, cooldown_s=cooldown_s)

    def key(self, h: BlockHash) -> str:
        return self.prefix + h.hex()

    def _ttl(self, ttl_s: float) -> int:
        return max(1, math.ceil(max(self.default_ttl_s, ttl_s)))

    def _call(self, fn: Callable[[], T]) -> T:
        if not self.breaker.allow():
            raise TierError("redis circuit open (recent failures)")
        try:
            result = fn()
        except (redis.RedisError, OSError) as e:
            self.breaker.failure()
            raise TierError(f"redis: {e}") from e
        self.breaker.success()
        return result

    # ---- the Tier interface --------------------------------------------------------------------

    def chain(self, hashes: Sequence[BlockHash]) -> int:
        if not hashes:
            return 0

        def exists() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for h in hashes:
                pipe.exists(self.key(h))
            return pipe.execute()

        n = 0
        for present in self._call(exists):
            if not present:
                break
            n += 1
        return n

    def get_many(self, hashes: Sequence[BlockHash]) -> list[bytes | None]:
        if not hashes:
            return []
        values = self._call(lambda: self.client.mget([self.key(h) for h in hashes]))
        return [v if isinstance(v, bytes) else None for v in values]

    def put(self, block_hash: BlockHash, header: bytes, payload: memoryview, ttl_s: float) -> None:
        value = header + payload.tobytes()
        self._call(lambda: self.client.set(self.key(block_hash), value, ex=self._ttl(ttl_s)))

    def touch(self, block_hash: BlockHash, ttl_s: float) -> None:
        self._call(lambda: self.client.expire(self.key(block_hash), self._ttl(ttl_s)))

    def delete(self, block_hash: BlockHash) -> None:
        self._call(lambda: self.client.delete(self.key(block_hash)))

    def gauges(self) -> dict[str, int]:
        return {"circuit_open": int(self.breaker.is_open)}

    def stored_keys(self) -> list[str]:
        return sorted(k.decode() for k in self._call(lambda: list(self.client.scan_iter(self.prefix + "*"))))

    def close(self) -> None:
        self.client.close()
