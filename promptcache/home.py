"""Where promptcache keeps its own files (random checkpoints, identity digests of read-only ones)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("PROMPTCACHE_HOME", Path.home() / ".cache" / "promptcache"))
