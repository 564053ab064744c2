"""The bf16 flash attention kernel of ``csrc/flash_bf16.c`` for CPUs with AVX512-BF16, compiled on
first use with the machine's C compiler and called through ctypes (no torch headers, so it builds in
a second; the library links the OpenMP runtime torch has already loaded, so both share its threads).

``flash_attention`` has the signature of ``cascade.Kernel`` and takes grouped-query heads as they
are (query head h reads KV head h // (H / kvh)). What it does not take — masks, other dtypes, head
sizes that are not a multiple of 32 — goes to PyTorch's CPU flash kernel, the same as without it.

Whether it is used (``cpu_attention_kernel()``): ``PROMPTCACHE_CPU_ATTENTION`` = ``auto`` (default:
on a CPU with AVX512-BF16 and without AMX, where it was measured faster; with AMX PyTorch's kernel
runs on the tile units), ``native`` (wherever it can run), or ``torch``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from promptcache.home import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "flash_bf16.c"
# explicit ISA flags, not -march=native: the library builds on any x86-64 gcc/clang; it runs only
# where the CPU has these (checked before loading)
CFLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
          "-mavx512dq", "-mavx512bf16", "-mfma")
NEEDS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")
MODES = ("auto", "native", "torch")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def can_run(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return all(f in flags for f in NEEDS)


def build(out_dir: Path | None = None) -> Path:
    """Compile the library (once per source, flags and compiler; cached under the promptcache home)
    and return its path. Raises RuntimeError with the compiler's message when it cannot."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler (gcc, cc or clang) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(CFLAGS), version]).encode()).hexdigest()[:16]
    out_dir = out_dir or cache_root() / "kernels"
    target = out_dir / f"flash_bf16-{digest}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        part = Path(tmp) / target.name
        res = subprocess.run([cc, *CFLAGS, str(SOURCE), "-o", str(part), "-lm"], capture_output=True, text=True,
                             check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} could not build {SOURCE.name}: {res.stderr.strip()[-2000:]}")
        os.replace(part, target)  # atomic: a concurrent build of the same digest writes the same file
    return target


class Library:
    def __init__(self, path: Path) -> None:
        torch.get_num_threads()  # torch's OpenMP runtime is loaded first: the library reuses it
        self.lib = ctypes.CDLL(str(path))
        p, i64, arr = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)
        self.lib.pc_flash_bf16.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i64, i64, arr, arr, arr, arr, arr, p,
                                           ctypes.c_float, ctypes.c_int, ctypes.c_int]
        self.lib.pc_flash_bf16.restype = ctypes.c_int

    def flash(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
              num_threads: int | None = None, kv_lens: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """q [B, H, M, d], k, v [B, kvh, N, d] bf16 (any strides, last dim contiguous) ->
        (out [B, H, M, d] bf16, lse [B, H, M] float32), or None for arguments it does not take.
        ``kv_lens``: [B] int64, the keys of each sequence (the rest of its N are not read)."""
        b, h, m, d = q.shape
        kvh, n = k.shape[1], k.shape[2]
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
            return None
        if kv_lens is not None:
            assert kv_lens.dtype == torch.int64 and kv_lens.is_contiguous() and kv_lens.shape == (b,)
            assert int(kv_lens.max()) <= n
        out = torch.empty(b, h, m, d, dtype=torch.bfloat16)
        lse = torch.empty(b, h, m, dtype=torch.float32)
        strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (q, k, v, out)]
        lse_strides = (ctypes.c_int64 * 3)(*lse.stride())
        rc = self.lib.pc_flash_bf16(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
                                    b, h, kvh, m, n, d, *strides, lse_strides,
                                    kv_lens.data_ptr() if kv_lens is not None else None, scale, int(causal),
                                    num_threads or torch.get_num_threads())
        if rc == -2:
            raise MemoryError("flash_bf16: out of memory for its packed K/V")
        return (out, lse) if rc == 0 else None


@functools.cache
def library() -> Library | None:
    """The compiled library, or None where it cannot run or build (logged once)."""
    if not can_run():
        return None
    try:
        return Library(build())
    except (RuntimeError, OSError) as e:
        log.warning("native CPU attention unavailable, using PyTorch's kernel: %s", e)
        return None


def cpu_attention_kernel() -> str:
    """"native" or "torch": the CPU attention kernel this process uses (see the module doc)."""
    mode = os.environ.get("PROMPTCACHE_CPU_ATTENTION", "auto")
    if mode not in MODES:
        raise ValueError(f"PROMPTCACHE_CPU_ATTENTION={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "torch":
        return "torch"
    if mode == "auto" and "amx_bf16" in cpu_flags():
        return "torch"
    return "native" if library() is not None else "torch"
