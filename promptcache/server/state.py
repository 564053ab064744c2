"""What every route needs: the engine, the key table, metrics, and the request-level checks."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from promptcache.engine.api import AsyncEngine, SamplingParams
from promptcache.server.activity import ActivityLog
from promptcache.server.auth import resolve_tenant
from promptcache.server.cached_contents import CachedContents
from promptcache.server.costs import PriceTable
from promptcache.server.diagnosis import History
from promptcache.server.errors import ApiError
from promptcache.server.metrics import ServerMetrics
from promptcache.server.response_store import ResponseStore
from promptcache.server.retention import parse_ttl
from promptcache.tokenizer import Tokenizer

# Normalizers may drop characters before tokenizing: keep a margin so no prompt that fits is refused.
CHARS_PER_TOKEN_MARGIN = 2


def prompt_char_limit(tok: Tokenizer, max_model_len: int) -> int:
    """Characters beyond which a prompt cannot fit in ``max_model_len`` tokens: a token stands for at
    most as many characters as its vocabulary entry has (byte-level entries spell one byte per
    character). Checked before tokenizing, so a huge body is refused without tokenizing it."""
    longest = max((len(t) for t in tok.convert_ids_to_tokens(range(tok.vocab_size))), default=1)
    return max_model_len * max(1, longest) * CHARS_PER_TOKEN_MARGIN


@dataclass
class ServerState:
    aengine: AsyncEngine
    api_keys: dict[str, str] | None
    model_names: tuple[str, ...]  # the first is the one responses report
    metrics: ServerMetrics
    max_prompt_chars: int
    output_cap: int = 4096  # max_tokens of a request that sends none (--default-max-tokens; 0: none)
    history: History = field(default_factory=History)  # recent prompts per tenant (server/diagnosis.py)
    prices: PriceTable = field(default_factory=PriceTable)
    created: int = field(default_factory=lambda: int(time.time()))  # /v1/models: when serving began
    responses: ResponseStore = field(default_factory=ResponseStore)  # stored Responses-API responses
    cached_contents: CachedContents = field(default_factory=CachedContents)  # Gemini's explicit caches
    pin_budget: int | None = None  # pinned tokens per tenant (--max-pinned-tokens; None: half the KV cache)
    activity: ActivityLog = field(default_factory=ActivityLog)  # what the dashboard shows (server/dashboard.py)

    @property
    def max_pinned_tokens(self) -> int:
        return self.pin_budget if self.pin_budget is not None else self.kv_capacity_tokens // 2

    @property
    def block_size(self) -> int:
        return self.aengine.info.block_size

    @property
    def tokenizer(self) -> Tokenizer:
        return self.aengine.info.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.aengine.info.max_model_len

    @property
    def kv_capacity_tokens(self) -> int:
        return self.aengine.info.kv_capacity_tokens

    def check_model(self, name: str, anthropic: bool) -> str:
        """The served name for ``name``; 404 in the dialect's words when this server does not serve it."""
        if name in self.model_names:
            return self.model_names[0]
        if anthropic:
            raise ApiError(404, f"model: {name}")
        raise ApiError(404, f"The model `{name}` does not exist or you do not have access to it.",
                       param="model", code="model_not_found")

    def default_max_tokens(self, num_prompt_tokens: int) -> int:
        """No max_tokens sent: up to ``output_cap`` tokens (0: no cap), as far as the context and
        the KV cache allow."""
        room = max(1, min(self.max_model_len, self.kv_capacity_tokens) - num_prompt_tokens)
        return min(room, self.output_cap) if self.output_cap > 0 else room


def get_state(request: Request) -> ServerState:
    state = request.app.state.server
    assert isinstance(state, ServerState)
    return state


def tenant_of(request: Request) -> str | None:
    """FastAPI dependency: the caller's tenant (None on an open server), resolved by ``ApiGuard``
    before the body was read; resolved here (or a 401) if the guard did not run."""
    if hasattr(request.state, "tenant"):
        tenant: str | None = request.state.tenant
        return tenant
    return resolve_tenant(request, get_state(request).api_keys)


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def sampling_params(**kwargs: Any) -> SamplingParams:
    """SamplingParams from request fields (None = the default); invalid values are a 400."""
    given = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return SamplingParams(**given)
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def ttl_seconds(value: str | float | None, param: str) -> float:
    try:
        return parse_ttl(value)
    except ValueError as e:
        raise ApiError(400, str(e), param=param) from None
