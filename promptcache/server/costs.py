"""What a request would cost at a provider's prices, and what the cache saved.

A price table gives, per served model, US dollars per million tokens of: ``input`` (uncached
prompt tokens), ``cached_input`` (prompt tokens read from the cache), ``cache_write_5m`` and
``cache_write_1h`` (prompt tokens newly stored with a retention under / at least one hour) and
``output``. Unset entries follow the providers' ratios to ``input``: cached reads 0.1x, writes
1.25x (5 minutes) and 2x (1 hour). Prompt tokens stored without a retention (plain LRU caching,
OpenAI's implicit caching) are billed as input, as OpenAI bills them.

``--prices FILE``: ``{"default": {"input": 3.0, "output": 15.0}, "my-model": {"input": 0.5, ...}}``.
Without a file: ``DEFAULT_PRICES`` (input $1, output $4 per million — a round figure to make
savings visible, not any provider's price).

Each response carries ``promptcache_cost`` (an extension field): the request's cost, its cost had
nothing been cached, and the difference (``saved``, negative when paid-for writes were not reused).
``/metrics`` counts both per tenant.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from promptcache.engine.api import Usage

ONE_HOUR_S = 3600.0
CACHED_READ, WRITE_5M, WRITE_1H = 0.1, 1.25, 2.0  # x input, the providers' ratios


@dataclass(frozen=True)
class Prices:
    """US dollars per million tokens."""

    input: float = 1.0
    output: float = 4.0
    cached_input: float | None = None
    cache_write_5m: float | None = None
    cache_write_1h: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not (isinstance(value, int | float) and 0 <= value < float("inf")):
                raise ValueError(f"price {f.name} must be a non-negative number, got {value!r}")

    def rate(self, name: str) -> float:
        value = getattr(self, name)
        if value is not None:
            return float(value)
        return self.input * {"cached_input": CACHED_READ, "cache_write_5m": WRITE_5M, "cache_write_1h": WRITE_1H}[name]


DEFAULT_PRICES = Prices()


@dataclass(frozen=True)
class Cost:
    input: float
    cached_input: float
    cache_writes: float
    output: float
    without_cache: float  # the same request with nothing read from or written to the cache

    @property
    def total(self) -> float:
        return self.input + self.cached_input + self.cache_writes + self.output

    @property
    def saved(self) -> float:
        return self.without_cache - self.total

    def as_dict(self) -> dict[str, Any]:
        def usd(x: float) -> float:
            return round(x, 10)

        return {"currency": "USD", "input": usd(self.input), "cached_input": usd(self.cached_input),
                "cache_writes": usd(self.cache_writes), "output": usd(self.output), "total": usd(self.total),
                "without_cache": usd(self.without_cache), "saved": usd(self.saved)}


class PriceTable:
    def __init__(self, by_model: dict[str, Prices] | None = None, default: Prices = DEFAULT_PRICES) -> None:
        self.by_model = dict(by_model or {})
        self.default = default

    @classmethod
    def load(cls, path: str | None, model_names: Sequence[str] = ()) -> PriceTable:
        if path is None:
            return cls()
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"--prices {path}: {e}") from None
        if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
            raise ValueError(f'--prices {path}: expected {{"default" or a model name: {{"input": ..., ...}}}}')
        try:
            table = {name: Prices(**entry) for name, entry in raw.items()}
        except TypeError as e:
            raise ValueError(f"--prices {path}: {e} (known: {', '.join(f.name for f in fields(Prices))})") from None
        default = table.pop("default", DEFAULT_PRICES)
        unknown = sorted(set(table) - set(model_names))
        if unknown and model_names:
            raise ValueError(f"--prices {path}: {', '.join(unknown)} is not a served model "
                             f"(served: {', '.join(model_names)}; use \"default\" for all)")
        return cls(table, default)

    def prices(self, model: str) -> Prices:
        return self.by_model.get(model, self.default)

    def cost(self, model: str, u: Usage) -> Cost:
        p = self.prices(model)
        million = 1e6
        by_ttl = u.cache_write_tokens_by_ttl
        written_1h = sum(n for ttl, n in by_ttl.items() if ttl >= ONE_HOUR_S)
        written_5m = sum(n for ttl, n in by_ttl.items() if 0 < ttl < ONE_HOUR_S)
        uncached = u.prompt_tokens - u.cached_tokens - written_1h - written_5m
        return Cost(
            input=uncached * p.input / million,
            cached_input=u.cached_tokens * p.rate("cached_input") / million,
            cache_writes=(written_5m * p.rate("cache_write_5m") + written_1h * p.rate("cache_write_1h")) / million,
            output=u.completion_tokens * p.output / million,
            without_cache=(u.prompt_tokens * p.input + u.completion_tokens * p.output) / million,
        )
