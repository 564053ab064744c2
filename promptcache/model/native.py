"""promptcache's own bf16 CPU kernels, for CPUs with AVX512-BF16: flash attention
(``csrc/flash_bf16.c``) and a decoder layer's row-wise ops in one pass each (``csrc/ops_bf16.c``:
RMSNorm, RoPE, SiLU-and-multiply). Compiled on first use with the machine's C compiler and called through
ctypes (no torch headers, so it builds in a second; the library links the OpenMP runtime torch has
already loaded, so both share its threads; the GIL is released while a kernel runs).

``Library.flash`` takes grouped-query heads as they are (query head h reads KV head h // (H / kvh))
and returns None for what it does not take (head sizes that are not a multiple of 32, a strided
last dimension): the caller then runs PyTorch's kernel, as without it (``kernels.native_flash``).

Whether they are used (``native_attention()``, ``native_ops()``): ``PROMPTCACHE_CPU_KERNELS`` =
``auto`` (default: wherever the CPU can run them, except attention on AMX CPUs, where PyTorch's
flash kernel runs on the tile units), ``native`` (attention on AMX CPUs too), or ``torch``. Only
bf16 compute on the CPU uses them, never deterministic mode (its batch-invariant ops are its own).
"""

from __future__ import annotations

import contextlib
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
from torch.profiler import record_function

from promptcache.home import cache_root

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "flash_bf16.c", CSRC / "ops_bf16.c")
HEADERS = (CSRC / "exp512.h",)  # part of the build's digest too
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
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    except OSError as e:
        raise RuntimeError(f"C compiler {cc!r} does not run: {e}") from e
    texts = [src.read_text() for src in (*SOURCES, *HEADERS)]
    digest = hashlib.sha256("\0".join([*texts, " ".join(CFLAGS), version]).encode()).hexdigest()[:16]
    out_dir = out_dir or cache_root() / "kernels"
    target = out_dir / f"native_bf16-{digest}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        part = Path(tmp) / target.name
        res = subprocess.run([cc, *CFLAGS, *map(str, SOURCES), "-o", str(part), "-lm"], capture_output=True,
                             text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} could not build the native kernels: {res.stderr.strip()[-2000:]}")
        os.replace(part, target)  # atomic: a concurrent build of the same digest writes the same file
    return target


class Library:
    def __init__(self, path: Path) -> None:
        torch.get_num_threads()  # torch's OpenMP runtime is loaded first: the library reuses it
        self.lib = ctypes.CDLL(str(path))
        p, i64, arr = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)
        self.lib.pc_flash_bf16.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i64, i64, arr, arr, arr, arr, arr, p,
                                           p, ctypes.c_float, ctypes.c_int, ctypes.c_int]
        self.lib.pc_flash_bf16.restype = ctypes.c_int
        self.lib.pc_rms_norm_bf16.argtypes = [p, i64, p, p, i64, i64, ctypes.c_float, ctypes.c_int]
        self.lib.pc_rms_norm_bf16.restype = None
        self.lib.pc_silu_mul_bf16.argtypes = [p, i64, p, i64, i64, ctypes.c_int]
        self.lib.pc_silu_mul_bf16.restype = None
        self.lib.pc_write_kv_bf16.argtypes = [p, i64, i64, p, i64, i64, p, p, i64, i64, p, i64, i64, i64, ctypes.c_int]
        self.lib.pc_write_kv_bf16.restype = None
        self.lib.pc_rope_bf16.argtypes = [p, i64, i64, p, p, i64, p, i64, i64, i64, ctypes.c_int]
        self.lib.pc_rope_bf16.restype = None
        self.lib.pc_add_rms_norm_bf16.argtypes = [p, p, p, p, p, i64, i64, ctypes.c_float, ctypes.c_int]
        self.lib.pc_add_rms_norm_bf16.restype = None

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``s = x + delta`` and ``rms_norm(s)`` (as ``rms_norm``) in one pass: x, delta [T, H] bf16."""
        x, delta = x.contiguous(), delta.contiguous()
        assert x.dtype == delta.dtype == weight.dtype == torch.bfloat16 and x.shape == delta.shape and x.dim() == 2
        total, out = torch.empty_like(x), torch.empty_like(x)
        with _named("native::add_rms_norm_bf16"):
            self.lib.pc_add_rms_norm_bf16(x.data_ptr(), delta.data_ptr(), weight.data_ptr(), total.data_ptr(),
                                          out.data_ptr(), x.shape[0], x.shape[1], eps, torch.get_num_threads())
        return total, out

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE in one pass: x [T, heads, d] bf16 (any row / head strides), cos, sin
        [T, 1, d] bf16 -> ``x * cos + rotate_half(x) * sin`` [T, heads, d], contiguous."""
        t, heads, d = x.shape
        assert x.dtype == cos.dtype == sin.dtype == torch.bfloat16 and d % 2 == 0
        assert x.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride() == sin.stride()
        assert cos.shape == sin.shape == (t, 1, d)
        out = torch.empty(t, heads, d, dtype=torch.bfloat16)
        with _named("native::rope_bf16"):
            self.lib.pc_rope_bf16(x.data_ptr(), x.stride(0), x.stride(1), cos.data_ptr(), sin.data_ptr(),
                                  cos.stride(0), out.data_ptr(), t, heads, d, torch.get_num_threads())
        return out

    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """``attention.write_kv`` for bf16: k, v [T, kvh, d] into kv_cache [2, kvh, slots, d] at ``slots``
        (the step's slot mapping: in range by construction, not checked per call)."""
        t, h, d = k.shape
        assert k.dtype == v.dtype == kv_cache.dtype == torch.bfloat16 and k.stride(-1) == v.stride(-1) == 1
        assert slots.dtype == torch.int64 and slots.is_contiguous() and kv_cache.stride(-1) == 1
        assert slots.shape == (t,) and v.shape == k.shape and kv_cache.shape[1] == h and kv_cache.shape[3] == d
        with _named("native::write_kv_bf16"):
            self.lib.pc_write_kv_bf16(k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(), v.stride(0),
                                      v.stride(1), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), kv_cache.stride(1),
                                      kv_cache.stride(2), slots.data_ptr(), t, h, d, torch.get_num_threads())

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [..., H] bf16 (rows of any stride, last dim contiguous), weight [H] bf16 -> bf16, contiguous:
        ``weight * rms_norm(x.float()).to(bf16)`` in one pass."""
        h = x.shape[-1]
        rows = x.reshape(-1, h)  # a view where it can be
        assert x.dtype == weight.dtype == torch.bfloat16 and rows.stride(-1) == 1 and weight.is_contiguous()
        out = torch.empty(rows.shape, dtype=torch.bfloat16)
        with _named("native::rms_norm_bf16"):
            self.lib.pc_rms_norm_bf16(rows.data_ptr(), rows.stride(0), weight.data_ptr(), out.data_ptr(),
                                      rows.shape[0], h, eps, torch.get_num_threads())
        return out.view(x.shape)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [T, 2I] bf16 -> ``silu(gate) * up`` [T, I] bf16 in one pass."""
        t, two_i = gate_up.shape
        assert gate_up.dtype == torch.bfloat16 and gate_up.stride(-1) == 1 and two_i % 2 == 0
        out = torch.empty(t, two_i // 2, dtype=torch.bfloat16)
        with _named("native::silu_mul_bf16"):
            self.lib.pc_silu_mul_bf16(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), t, two_i // 2,
                                      torch.get_num_threads())
        return out

    def flash(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
              num_threads: int | None = None, kv_lens: torch.Tensor | None = None,
              kv_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """q [B, H, M, d], k, v [B, kvh, N, d] bf16 (any strides, last dim contiguous) ->
        (out [B, H, M, d] bf16, lse [B, H, M] float32), or None for arguments it does not take.
        ``kv_lens``: [B] int64, the keys of each sequence (the rest of its N are not read).
        ``kv_idx``: [B, N] int64, the rows of k, v holding each sequence's keys (then k, v are
        ``[kvh, slots, d]``: a paged cache read in place, no gather). Lengths and slots come from the
        step's plan, in range by construction: they are not checked per call (a check is a sync)."""
        b, h, m, d = q.shape
        if kv_idx is not None:
            assert kv_idx.dtype == torch.int64 and kv_idx.is_contiguous() and kv_idx.shape[0] == b
            assert k.dim() == 3
            k, v = k.unsqueeze(0).expand(b, -1, -1, -1), v.unsqueeze(0).expand(b, -1, -1, -1)  # stride 0 over b
        kvh, n = k.shape[1], (k.shape[2] if kv_idx is None else kv_idx.shape[1])
        assert v.shape == k.shape and k.shape[0] == b and k.shape[-1] == d and k.dtype == v.dtype == q.dtype
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
            return None
        if kv_lens is not None:
            assert kv_lens.dtype == torch.int64 and kv_lens.is_contiguous() and kv_lens.shape == (b,)
        out = torch.empty(b, h, m, d, dtype=torch.bfloat16)
        lse = torch.empty(b, h, m, dtype=torch.float32)
        strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (q, k, v, out)]
        lse_strides = (ctypes.c_int64 * 3)(*lse.stride())
        with _named("native::flash_bf16"):  # named in torch profiler tables
            rc = self.lib.pc_flash_bf16(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
                                        b, h, kvh, m, n, d, *strides, lse_strides,
                                        kv_lens.data_ptr() if kv_lens is not None else None,
                                        kv_idx.data_ptr() if kv_idx is not None else None, scale, int(causal),
                                        num_threads or torch.get_num_threads())
        if rc == -2:
            raise MemoryError("flash_bf16: out of memory for its packed K/V")
        return (out, lse) if rc == 0 else None


def _named(name: str) -> contextlib.AbstractContextManager[object]:
    """A torch profiler range named ``name`` while a profiler runs (``native::*`` in its tables);
    nothing otherwise (a range costs ~20 us per call, 6 % of a decode step)."""
    return record_function(name) if torch._C._autograd._profiler_enabled() else contextlib.nullcontext()


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


def _mode() -> str:
    mode = os.environ.get("PROMPTCACHE_CPU_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"PROMPTCACHE_CPU_KERNELS={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def native_attention(flags: set[str] | None = None) -> bool:
    """Whether bf16 attention runs in our kernel (see the module doc): not by default on AMX CPUs,
    where PyTorch's flash kernel runs on the tile units (ours has not been measured against it)."""
    mode = _mode()
    if mode == "torch" or (mode == "auto" and "amx_bf16" in (cpu_flags() if flags is None else flags)):
        return False
    return library() is not None


def native_ops() -> bool:
    """Whether bf16 RMSNorm and gated SiLU run in our one-pass kernels (wherever they can run, AMX CPUs
    included: row-wise ops, no tile units involved)."""
    return _mode() != "torch" and library() is not None
