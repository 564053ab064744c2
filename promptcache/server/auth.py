"""API keys -> tenants. The tenant, derived here and never taken from the request body, is the cache
namespace: two tenants never share a KV block, whatever they send."""

from __future__ import annotations

import hmac
import json
from pathlib import Path

from fastapi import Request

from promptcache.server.errors import ApiError, is_anthropic, is_gemini


def load_api_keys(path: str | Path) -> dict[str, str]:
    """Read ``{"sk-a": "acme", "sk-b": "globex"}`` (API key -> tenant name) and check its shape."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON object mapping API keys to tenant names")
    for key, tenant in data.items():
        if not key or not isinstance(tenant, str) or not tenant:
            raise ValueError(f"{path}: every key must be a non-empty string mapped to a non-empty tenant")
    return dict(data)


def presented_key(request: Request) -> str | None:
    """The key a client sent: ``x-api-key`` (Anthropic SDK), ``x-goog-api-key`` or ``?key=``
    (Gemini), or ``Authorization: Bearer`` (OpenAI SDK)."""
    url_key = request.query_params.get("key") if is_gemini(request) else None  # Gemini's ?key= only
    for key in (request.headers.get("x-api-key"), request.headers.get("x-goog-api-key"), url_key):
        if key:
            return key
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def resolve_tenant(request: Request, api_keys: dict[str, str] | None) -> str | None:
    """The caller's tenant; None on an open (single-tenant) server. Raises a 401 ApiError."""
    if api_keys is None:
        return None
    key = presented_key(request)
    tenant = None
    if key is not None:
        # compare against every key in constant time: no timing hint about which prefix matched
        for known, name in api_keys.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                tenant = name
    if tenant is not None:
        return tenant
    if is_gemini(request):
        if key is None:
            raise ApiError(401, "Method doesn't allow unregistered callers (callers without established identity). "
                                "Please use an API key (x-goog-api-key header or ?key=).")
        raise ApiError(401, "API key not valid. Please pass a valid API key.")  # Google: a 400; 401 is HTTP's
    if is_anthropic(request):
        message = "x-api-key header is required" if key is None else "invalid x-api-key"
        raise ApiError(401, message)
    if key is None:
        message = ("You didn't provide an API key. You need to provide your API key in an Authorization "
                   "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
    else:
        message = f"Incorrect API key provided: {_redact(key)}."
    raise ApiError(401, message, code="invalid_api_key")


def _redact(key: str) -> str:
    return key[:3] + "*" * max(0, len(key) - 7) + key[-4:] if len(key) > 8 else "*" * len(key)


def load_admin_keys(path: str) -> tuple[str, ...]:
    """Read a JSON list of operator keys (for /metrics and detailed /health)."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list) or not data or not all(isinstance(k, str) and k for k in data):
        raise ValueError(f"{path}: expected a non-empty JSON list of operator keys")
    return tuple(data)


def is_operator(request: Request, api_keys: dict[str, str] | None, admin_keys: tuple[str, ...]) -> bool:
    """Whether the caller may see every tenant's traffic: anyone on an open server; with API keys
    configured, only a caller presenting an operator key (constant-time comparison)."""
    if api_keys is None:
        return True
    key = presented_key(request)
    if key is None:
        return False
    found = False
    for known in admin_keys:
        found |= hmac.compare_digest(known.encode(), key.encode())
    return found
