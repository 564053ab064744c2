"""HTTP server: OpenAI and Anthropic dialects over the async engine (tensors never reach this layer).

``create_app`` is imported lazily so that building the CLI parser (which imports
``promptcache.server.cli``) does not load FastAPI or the engine.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from promptcache.server.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
