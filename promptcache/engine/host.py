"""Process-level settings of the host the engine runs on.

glibc's malloc serves every allocation above its mmap threshold (128 KiB, adjusted upwards up to
32 MiB as such blocks are freed) with a fresh ``mmap`` and returns it to the kernel on free, so each
large temporary of a step — an activation of a 2,048-token prefill is 4-25 MB — is faulted in page
by page again: 163,839 minor page faults per 2,048-token prefill of smollm2-135m, about 6 % of its
time on a 2-core AVX2 EPYC (6.95 -> 6.55 s mean over 4 prefills, 7 faults once tuned). vLLM asks
its CPU users to preload tcmalloc for the same reason; promptcache sets glibc's own knobs instead:
large blocks come from the heap and freed memory stays there for the next step. The cost is that the
process keeps its peak heap (a step's temporaries) instead of returning it between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB from the heap; larger (a KV cache) still mmap'd
TRIM_THRESHOLD = (1 << 31) - 1  # never give the heap's top back between steps
# a user's own allocator choice wins: glibc's env knobs, or a preloaded malloc
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
OPT_OUT = "PROMPTCACHE_MALLOC"  # =system: leave malloc as it is


def _user_chose() -> str | None:
    if os.environ.get(OPT_OUT, "") == "system":
        return f"{OPT_OUT}=system"
    for name in USER_SETTINGS:
        if name in os.environ:
            return name
    preload = os.environ.get("LD_PRELOAD", "")
    if any(lib in preload for lib in ("tcmalloc", "jemalloc", "mimalloc")):
        return "LD_PRELOAD"
    return None


_done: bool | None = None


def tune_malloc() -> bool:
    """Keep large blocks on glibc's heap (once per process); False where the libc is not glibc or
    the user chose an allocator setting of their own."""
    global _done
    if _done is not None:
        return _done
    _done = False
    reason = _user_chose()
    if reason is not None:
        log.info("malloc left as configured (%s)", reason)
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
