"""What the server may use of the engine: a narrow face of plain types and one async engine.

The server imports from here (and builds the engine in its CLI), never from ``cache/`` or
``model/`` and never through an engine's attributes: the layering test checks both.
"""

from __future__ import annotations

from promptcache.cache import (
    BELOW_ONE_BLOCK,
    EVICTED,
    EXPIRED,
    IN_FLIGHT,
    MAX_TTL_S,
    NO_RETENTION,
    NOT_CACHED,
    RESET,
    REUSED_ALL,
    Retention,
    ReuseStop,
)
from promptcache.engine.async_engine import AsyncEngine, EngineDead, EngineOverloaded
from promptcache.engine.info import EngineInfo, EngineStats
from promptcache.engine.request import RequestOutput, RequestSpec, TokenLogprob
from promptcache.engine.sampling import SamplingParams, StructuredOutput
from promptcache.engine.usage import Usage

__all__ = [
    "BELOW_ONE_BLOCK",
    "EVICTED",
    "EXPIRED",
    "IN_FLIGHT",
    "MAX_TTL_S",
    "NOT_CACHED",
    "RESET",
    "REUSED_ALL",
    "ReuseStop",
    "NO_RETENTION",
    "AsyncEngine",
    "EngineDead",
    "EngineInfo",
    "EngineStats",
    "EngineOverloaded",
    "RequestOutput",
    "RequestSpec",
    "Retention",
    "SamplingParams",
    "StructuredOutput",
    "TokenLogprob",
    "Usage",
]
