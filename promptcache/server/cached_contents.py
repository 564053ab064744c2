"""Gemini's explicit caches (``cachedContents``): resources a client creates, lists, extends and
deletes, each a prompt prefix held (pinned) in memory while it lives.

A cached content keeps its rendered prefix (system instruction, tools, contents), the token ids
the chat template gives it, and the id of the engine pin that holds its blocks
(``LLMEngine.pin``: never evicted while it lives). Per tenant, the pinned tokens of every live
cached content count against a budget; past it a create is refused with the numbers. Expiry is
checked on every access (and the engine drops an expired pin by itself between steps).
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from promptcache.server.prompt import TemplateMessage
from promptcache.server.tools import Tool

DEFAULT_TTL_S = 3600.0  # Gemini's default lifetime
MAX_TTL_S = 30 * 86400.0
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(value: str) -> float:
    """``2026-12-01T20:00:00Z`` (fractional seconds, offsets allowed) -> unix seconds; ValueError if not."""
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError(f"expireTime {value!r} has no time zone (use e.g. 2026-12-01T20:00:00Z)")
    return parsed.timestamp()


@dataclass(frozen=True)
class CachedContent:
    id: str
    model: str
    display_name: str | None
    created: float
    updated: float
    expires: float
    messages: tuple[TemplateMessage, ...]
    tool_dicts: list[dict[str, Any]] | None  # as the chat template gets them
    tools: list[Tool]
    tool_mode: Any  # the ToolConfig the request would have carried (schemas_gemini.ToolConfig | None)
    token_ids: list[int] = field(repr=False)
    pin_id: str = ""
    pin_ids: list[int] = field(default_factory=list, repr=False)  # the part a request can reuse
    pinned: int = 0  # tokens the engine holds (whole blocks of pin_ids)

    @property
    def name(self) -> str:
        return f"cachedContents/{self.id}"

    def resource(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name, "model": f"models/{self.model}", "createTime": rfc3339(self.created),
                                "updateTime": rfc3339(self.updated), "expireTime": rfc3339(self.expires),
                                "usageMetadata": {"totalTokenCount": len(self.token_ids)}}
        if self.display_name is not None:
            body["displayName"] = self.display_name
        return body


def new_cache_id() -> str:
    return uuid.uuid4().hex[:16]


class CachedContents:
    def __init__(self, clock: Any = time.time) -> None:
        self.clock = clock
        self._by_tenant: dict[str | None, dict[str, CachedContent]] = {}
        self._reserved: dict[str | None, int] = {}  # tokens of creates in progress
        self._lock = threading.Lock()

    def _held(self, groups: list[dict[str, CachedContent]]) -> int:
        now = self.clock()
        return sum(len(c.pin_ids) for g in groups for c in g.values() if c.expires > now)

    def reserve(self, tenant: str | None, tokens: int, budget: int, room: int) -> str | None:
        """Count a create's tokens against the tenant's budget and the server's room before it runs
        (concurrent creates see each other); the refusal's message, or None. ``release`` after."""
        with self._lock:
            everyone = self._held(list(self._by_tenant.values())) + sum(self._reserved.values())
            used = self._held([self._by_tenant.get(tenant, {})]) + self._reserved.get(tenant, 0)
            if everyone + tokens > room:
                return (f"this cached content is {tokens} tokens; the server's live cached contents hold "
                        f"{everyone} of the {room} tokens pins may take (three quarters of the KV cache). "
                        "Delete one, or wait for one to expire.")
            if used + tokens > budget:
                return (f"this cached content is {tokens} tokens; with the {used} tokens this tenant's live "
                        f"cached contents hold, that exceeds the budget of {budget} pinned tokens per tenant "
                        "(--max-pinned-tokens). Delete one, or wait for one to expire.")
            self._reserved[tenant] = self._reserved.get(tenant, 0) + tokens
            return None

    def release(self, tenant: str | None, tokens: int) -> None:
        with self._lock:
            self._reserved[tenant] = self._reserved.get(tenant, 0) - tokens

    def add(self, tenant: str | None, content: CachedContent) -> None:
        with self._lock:
            self._by_tenant.setdefault(tenant, {})[content.id] = content

    def get(self, tenant: str | None, cache_id: str) -> CachedContent | None:
        """The live cached content, or None (unknown, another tenant's, or expired)."""
        with self._lock:
            content = self._by_tenant.get(tenant, {}).get(cache_id)
        if content is None or content.expires <= self.clock():
            return None
        return content

    def expired(self) -> list[CachedContent]:
        """Remove and return every expired cached content (their pins are to be dropped)."""
        now = self.clock()
        gone = []
        with self._lock:
            for mine in self._by_tenant.values():
                for cid in [cid for cid, c in mine.items() if c.expires <= now]:
                    gone.append(mine.pop(cid))
        return gone

    def update(self, tenant: str | None, cache_id: str, expires: float) -> CachedContent | None:
        with self._lock:
            mine = self._by_tenant.get(tenant, {})
            content = mine.get(cache_id)
            if content is None:
                return None
            mine[cache_id] = replace(content, expires=expires, updated=self.clock())
            return mine[cache_id]

    def remove(self, tenant: str | None, cache_id: str) -> CachedContent | None:
        with self._lock:
            return self._by_tenant.get(tenant, {}).pop(cache_id, None)

    def page(self, tenant: str | None, page_size: int | None,
             page_token: str | None) -> tuple[list[CachedContent], str]:
        """One page, oldest first, and the token of the next ('' when this is the last)."""
        size = min(max(1, page_size or DEFAULT_PAGE_SIZE), MAX_PAGE_SIZE)
        start = 0
        if page_token:
            try:
                start = int(base64.urlsafe_b64decode(page_token.encode()).decode())
            except (ValueError, UnicodeDecodeError):
                raise ValueError("pageToken is not one this server issued") from None
        now = self.clock()
        with self._lock:
            live = sorted((c for c in self._by_tenant.get(tenant, {}).values() if c.expires > now),
                          key=lambda c: (c.created, c.id))
        if start < 0:
            raise ValueError("pageToken is not one this server issued")
        chunk = live[start : start + size]
        more = start + size < len(live)
        token = base64.urlsafe_b64encode(str(start + size).encode()).decode() if more else ""
        return chunk, token
