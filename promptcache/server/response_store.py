"""Stored responses of the Responses API, per tenant and bounded (``previous_response_id``, GET).

A stored response keeps its response object, the input items it was given (for
``/input_items``) and the conversation it ends — every message before it plus its own output,
without its ``instructions`` (OpenAI does not carry those over). A tenant never sees another
tenant's ids. Per tenant at most ``max_responses`` responses and ``max_chars`` characters of
conversation are kept; the least recently used go first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from promptcache.server.prompt import TemplateMessage

DEFAULT_MAX_RESPONSES = 1000
DEFAULT_MAX_CHARS = 64 << 20


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]
    input_items: tuple[dict[str, Any], ...]
    conversation: tuple[TemplateMessage, ...]
    chars: int


def conversation_chars(messages: tuple[TemplateMessage, ...]) -> int:
    return sum(len(p) for m in messages for p in m.parts) + sum(len(str(m.extra)) for m in messages if m.extra)


class ResponseStore:
    def __init__(self, max_responses: int = DEFAULT_MAX_RESPONSES, max_chars: int = DEFAULT_MAX_CHARS) -> None:
        self.max_responses, self.max_chars = max_responses, max_chars
        self._by_tenant: dict[str | None, OrderedDict[str, StoredResponse]] = {}
        self._chars: dict[str | None, int] = {}
        self._lock = threading.Lock()

    def put(self, tenant: str | None, rid: str, stored: StoredResponse) -> None:
        with self._lock:
            mine = self._by_tenant.setdefault(tenant, OrderedDict())
            mine[rid] = stored
            self._chars[tenant] = self._chars.get(tenant, 0) + stored.chars
            while len(mine) > 1 and (len(mine) > self.max_responses or self._chars[tenant] > self.max_chars):
                _, old = mine.popitem(last=False)
                self._chars[tenant] -= old.chars

    def get(self, tenant: str | None, rid: str) -> StoredResponse | None:
        with self._lock:
            mine = self._by_tenant.get(tenant)
            if mine is None or rid not in mine:
                return None
            mine.move_to_end(rid)
            return mine[rid]

    def delete(self, tenant: str | None, rid: str) -> bool:
        with self._lock:
            mine = self._by_tenant.get(tenant)
            if mine is None or rid not in mine:
                return False
            self._chars[tenant] -= mine.pop(rid).chars
            return True
