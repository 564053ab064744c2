"""engine/host.py: glibc keeps a step's large temporaries on its heap (no page faults per step)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from promptcache.engine import host

# Allocates, touches and frees a 64 MiB block six times; prints the minor page faults of the last
# three (a fresh mmap faults in all 16,384 pages each time, a reused heap block none; the first
# rounds may fault while the heap settles, e.g. when the thread pool starts).
PROBE = """
import resource, sys, torch
from promptcache.engine import host
tuned = host.tune_malloc() if sys.argv[1] == "tune" else False
counts = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 << 20, dtype=torch.float32)
    t.fill_(1.0)
    del t
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(tuned, sum(counts[3:]))
"""


def _probe(mode: str, **env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if k not in host.USER_SETTINGS + (host.OPT_OUT, "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True,
                         text=True, check=True, timeout=120).stdout.split()
    return out[0] == "True", int(out[1])


glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")


@glibc
def test_tuned_malloc_reuses_large_blocks():
    tuned, faults = _probe("tune")
    assert tuned
    assert faults < 500  # the heap block is reused: no page of it faults again
    untuned, faults = _probe("plain")
    assert not untuned
    assert faults > 3 * 8_000  # glibc's default: every 64 MiB block is a fresh mmap, faulted in again


@glibc
def test_user_allocator_settings_win():
    for env in ({"PROMPTCACHE_MALLOC": "system"}, {"MALLOC_MMAP_THRESHOLD_": "131072"}):
        tuned, faults = _probe("tune", **env)
        assert not tuned
        if "MALLOC_MMAP_THRESHOLD_" not in env:
            assert faults > 8_000
