"""Provider retention names are the server's vocabulary; the cache only sees seconds."""

from __future__ import annotations

import pytest

from promptcache.server.retention import RETENTION_NAMES, parse_ttl


def test_parse_ttl():
    assert parse_ttl("5m") == 300 and parse_ttl("1h") == 3600 and parse_ttl("24h") == 86400
    assert parse_ttl("30m") == 1800 and parse_ttl("300s") == 300 and parse_ttl(12) == 12
    assert parse_ttl("in_memory") == RETENTION_NAMES["in_memory"] and parse_ttl(None) == 0.0
    assert parse_ttl("1.5h") == 5400
    for bad in ("soon", "nanm", "infh", float("nan"), "9999d", -1, " 5m", "1e3s", "5 m", "+5m", "5M", ""):
        with pytest.raises(ValueError):
            parse_ttl(bad)
