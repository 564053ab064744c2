"""Provider retention vocabulary -> seconds. ``cache/`` speaks seconds only; the names are the APIs'.

OpenAI's ``prompt_cache_retention`` (``in_memory``, ``24h``), Anthropic's ``cache_control.ttl``
(``5m``, ``1h``) and our own extensions (``"300s"``, ``"30m"``, a number of seconds) all land here.
A block is kept this long after its last use (refreshed on every hit).
"""

from __future__ import annotations

import re

from promptcache.engine.api import MAX_TTL_S

RETENTION_NAMES = {"5m": 300.0, "in_memory": 600.0, "1h": 3600.0, "24h": 86400.0}
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# a duration string: a decimal number and a unit (the request schemas publish this pattern)
TTL_PATTERN = r"^(in_memory|[0-9]+(\.[0-9]+)?[smhd])$"
_TTL = re.compile(TTL_PATTERN)


def parse_ttl(value: str | float | int | None) -> float:
    """``"5m"``, ``"1h"``, ``"24h"``, ``"in_memory"``, ``"300s"``, ``"30m"`` or seconds -> seconds."""
    if value is None:
        return 0.0
    if isinstance(value, int | float):
        seconds = float(value)
    elif value in RETENTION_NAMES:
        seconds = RETENTION_NAMES[value]
    elif _TTL.match(value):
        seconds = float(value[:-1]) * _UNITS[value[-1]]
    else:
        raise ValueError(f"invalid ttl {value!r}: use e.g. '300s', '5m', '1h', '24h'")
    if not 0 <= seconds <= MAX_TTL_S:  # also rejects NaN and inf
        raise ValueError(f"ttl must be between 0 and 30 days, got {value!r}")
    return seconds
