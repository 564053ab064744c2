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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch.profiler import record_function

from promptcache.home import cache_root

log = logging.getLogger(__name__)
T = TypeVar("T")

CSRC = Path(__file__).with_name("csrc")


@dataclass(frozen=True)
class Spec:
    """One library: its sources, the headers they include (part of the build's digest), explicit ISA
    flags (not -march=native: it builds on any x86-64 gcc/clang, and runs only where the CPU has
    ``needs``, checked before loading)."""

    name: str
    sources: tuple[Path, ...]
    headers: tuple[Path, ...]
    isa: tuple[str, ...]
    needs: tuple[str, ...]

    @property
    def cflags(self) -> tuple[str, ...]:
        return ("-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp", *self.isa)


BF16 = Spec("native_bf16", (CSRC / "flash_bf16.c", CSRC / "ops_bf16.c"), (CSRC / "exp512.h",),
            ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"),
            ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"))
# float32 math (CPUs without native bf16: the engine computes in float32 there)
F32 = Spec("native_f32", (CSRC / "flash_f32.c",), (CSRC / "exp256.h",), ("-mavx2", "-mfma"),
           ("avx2", "fma"))
SPECS = (BF16, F32)
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


def can_run(flags: set[str] | None = None, spec: Spec = BF16) -> bool:
    flags = cpu_flags() if flags is None else flags
    return all(f in flags for f in spec.needs)


def build(out_dir: Path | None = None, spec: Spec = BF16) -> Path:
    """Compile a library (once per source, flags and compiler; cached under the promptcache home)
    and return its path. Raises RuntimeError with the compiler's message when it cannot."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler (gcc, cc or clang) on PATH")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    except OSError as e:
        raise RuntimeError(f"C compiler {cc!r} does not run: {e}") from e
    texts = [src.read_text() for src in (*spec.sources, *spec.headers)]
    digest = hashlib.sha256("\0".join([*texts, " ".join(spec.cflags), version]).encode()).hexdigest()[:16]
    out_dir = out_dir or cache_root() / "kernels"
    target = out_dir / f"{spec.name}-{digest}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        part = Path(tmp) / target.name
        res = subprocess.run([cc, *spec.cflags, *map(str, spec.sources), "-o", str(part), "-lm"], capture_output=True,
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
        assert q.dtype == k.dtype == v.dtype == torch.bfloat16
        return _flash(self.lib.pc_flash_bf16, "native::flash_bf16", (), q, k, v, scale, causal, num_threads, kv_lens,
                      kv_idx)


def _flash(fn: Callable[..., int], name: str, extra: tuple[int, ...], q: torch.Tensor, k: torch.Tensor,
           v: torch.Tensor, scale: float, causal: bool, num_threads: int | None, kv_lens: torch.Tensor | None,
           kv_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One flash call of either library (their arguments are the same but for ``extra``, passed
    before the thread count); output in q's dtype."""
    b, h, m, d = q.shape
    if kv_idx is not None:
        assert kv_idx.dtype == torch.int64 and kv_idx.is_contiguous() and kv_idx.shape[0] == b
        assert k.dim() == 3
        k, v = k.unsqueeze(0).expand(b, -1, -1, -1), v.unsqueeze(0).expand(b, -1, -1, -1)  # stride 0 over b
    kvh, n = k.shape[1], (k.shape[2] if kv_idx is None else kv_idx.shape[1])
    assert v.shape == k.shape and k.shape[0] == b and k.shape[-1] == d and k.dtype == v.dtype
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return None
    if kv_lens is not None:
        assert kv_lens.dtype == torch.int64 and kv_lens.is_contiguous() and kv_lens.shape == (b,)
    out = torch.empty(b, h, m, d, dtype=q.dtype)
    lse = torch.empty(b, h, m, dtype=torch.float32)
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (q, k, v, out)]
    lse_strides = (ctypes.c_int64 * 3)(*lse.stride())
    with _named(name):  # named in torch profiler tables
        rc = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), b, h, kvh, m, n, d,
                *strides, lse_strides, kv_lens.data_ptr() if kv_lens is not None else None,
                kv_idx.data_ptr() if kv_idx is not None else None, scale, int(causal), *extra,
                num_threads or torch.get_num_threads())
    if rc == -2:
        raise MemoryError(f"{name}: out of memory for its packed K/V")
    return (out, lse) if rc == 0 else None


class LibraryF32:
    """The float32 flash kernel (``csrc/flash_f32.c``, AVX2 + FMA): float32 queries over float32 or
    bf16 K/V (a bf16 KV cache beside float32 math), with ``Library.flash``'s shapes and meaning."""

    def __init__(self, path: Path) -> None:
        torch.get_num_threads()
        self.lib = ctypes.CDLL(str(path))
        p, i64, arr = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)
        self.lib.pc_flash_f32.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i64, i64, arr, arr, arr, arr, arr, p,
                                          p, ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.pc_flash_f32.restype = ctypes.c_int

    def flash(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
              num_threads: int | None = None, kv_lens: torch.Tensor | None = None,
              kv_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """As ``Library.flash`` for q float32 and k, v float32 or bf16; out float32. None for what it
        does not take (head sizes that are not a multiple of 16, a strided last dimension)."""
        assert q.dtype == torch.float32 and k.dtype in (torch.float32, torch.bfloat16)
        return _flash(self.lib.pc_flash_f32, "native::flash_f32", (int(k.dtype == torch.bfloat16),), q, k, v, scale,
                      causal, num_threads, kv_lens, kv_idx)


def _named(name: str) -> contextlib.AbstractContextManager[object]:
    """A torch profiler range named ``name`` while a profiler runs (``native::*`` in its tables);
    nothing otherwise (a range costs ~20 us per call, 6 % of a decode step)."""
    return record_function(name) if torch._C._autograd._profiler_enabled() else contextlib.nullcontext()


@functools.cache
def library() -> Library | None:
    """The compiled bf16 library, or None where it cannot run or build (logged once)."""
    return _load(BF16, Library)


@functools.cache
def library_f32() -> LibraryF32 | None:
    """The compiled float32 library, or None where it cannot run or build (logged once)."""
    return _load(F32, LibraryF32)


def _load(spec: Spec, cls: Callable[[Path], T]) -> T | None:
    if not can_run(spec=spec):
        return None
    try:
        return cls(build(spec=spec))
    except (RuntimeError, OSError) as e:
        log.warning("native CPU kernels (%s) unavailable, using PyTorch's: %s", spec.name, e)
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


def native_attention_f32(flags: set[str] | None = None) -> bool:
    """Whether float32 attention runs in our AVX2 kernel: by default where the CPU has no AVX-512
    (there it is measured against PyTorch's AVX2 kernel; PyTorch's AVX-512 kernel is twice as wide
    and unmeasured against it), anywhere it runs with ``native``."""
    mode = _mode()
    if mode == "torch" or (mode == "auto" and "avx512f" in (cpu_flags() if flags is None else flags)):
        return False
    return library_f32() is not None
