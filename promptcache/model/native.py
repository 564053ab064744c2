"""promptcache's own CPU kernels: flash attention and a decoder layer's row-wise ops in one pass each
(RMSNorm with the residual add before it, RoPE, SiLU-and-multiply, K/V writes), in two libraries:

- ``BF16`` (``csrc/flash_bf16.c``, ``csrc/ops_bf16.c``): bf16 math, for CPUs with AVX512-BF16;
- ``F32`` (``csrc/flash_f32.c``, ``csrc/ops_f32.c``): float32 math (its attention also reads a bf16
  KV cache), for CPUs with AVX2 and FMA — where the engine computes in float32 because bf16 math
  is not native.

Each is compiled on first use with the machine's C compiler and called through ctypes (no torch
headers, so it builds in a second; it links the OpenMP runtime torch has already loaded, so both
share its threads; the GIL is released while a kernel runs).

``Library.flash`` takes grouped-query heads as they are (query head h reads KV head h // (H / kvh))
and returns None for what it does not take (head sizes that are not a multiple of 32 for bf16, 16
for float32, a strided last dimension): the caller then runs PyTorch's kernel, as without it
(``kernels.native_flash``).

Whether they are used: ``PROMPTCACHE_CPU_KERNELS`` = ``auto`` (default: bf16 wherever the CPU can
run it, except attention on AMX CPUs, where PyTorch's flash kernel runs on the tile units; float32
on CPUs without AVX-512, where PyTorch's kernels are AVX2 too), ``native`` (both wherever they run),
or ``torch`` (``native_attention()``, ``native_ops()``, ``native_f32()``). Never in deterministic
mode (its batch-invariant ops are its own).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from promptcache.home import cache_root
from promptcache.model.native_lib import Library

log = logging.getLogger(__name__)

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
    dtype: torch.dtype  # of the tensors its ops take
    head_multiple: int  # head sizes its flash kernel takes: multiples of this, up to 256
    query_block: int  # its flash kernel's queries per work item (QB in the source)

    @property
    def cflags(self) -> tuple[str, ...]:
        return ("-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp", *self.isa)


BF16 = Spec("native_bf16", (CSRC / "flash_bf16.c", CSRC / "ops_bf16.c"), (CSRC / "exp512.h",),
            ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"),
            ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"), torch.bfloat16, 32, 32)
# float32 math (CPUs without native bf16: the engine computes in float32 there)
F32 = Spec("native_f32", (CSRC / "flash_f32.c", CSRC / "ops_f32.c"), (CSRC / "exp256.h",), ("-mavx2", "-mfma"),
           ("avx2", "fma"), torch.float32, 16, 24)
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


@functools.cache
def library() -> Library | None:
    """The compiled bf16 library, or None where it cannot run or build (logged once)."""
    return _load(BF16)


@functools.cache
def library_f32() -> Library | None:
    """The compiled float32 library, or None where it cannot run or build (logged once)."""
    return _load(F32)


def library_for(dtype: torch.dtype) -> Library | None:
    """The library whose ops take tensors of ``dtype`` (bf16 or float32), where it runs."""
    return library() if dtype == torch.bfloat16 else library_f32() if dtype == torch.float32 else None


def _load(spec: Spec) -> Library | None:
    if not can_run(spec=spec):
        return None
    try:
        return Library(build(spec=spec), spec.dtype)
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


def native_f32(flags: set[str] | None = None) -> bool:
    """Whether float32 attention and row-wise ops run in our AVX2 kernels: by default where the CPU
    has no AVX-512 (there they are measured against PyTorch's AVX2 kernels; PyTorch's AVX-512 ones
    are twice as wide and unmeasured against them), anywhere they run with ``native``."""
    mode = _mode()
    if mode == "torch" or (mode == "auto" and "avx512f" in (cpu_flags() if flags is None else flags)):
        return False
    return library_f32() is not None


def _spec(dtype: torch.dtype) -> Spec | None:
    return {torch.bfloat16: BF16, torch.float32: F32}.get(dtype)


def takes_head_dim(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether our flash kernel for ``dtype`` takes heads of this size (bf16: a multiple of 32, float32:
    of 16; at most 256). Where it does not, every call would fall back to PyTorch's kernel."""
    spec = _spec(dtype)
    return spec is not None and head_dim % spec.head_multiple == 0 and 0 < head_dim <= 256


def query_block(dtype: torch.dtype) -> int:
    """Queries per work item of our flash kernel for ``dtype``: a call whose rows per KV head fit one
    block packs each work item's own keys right before it reads them (decode-like calls); larger
    ones pack every KV head's keys up front, all at once."""
    spec = _spec(dtype)
    return spec.query_block if spec is not None else 0


def ops_library(dtype: torch.dtype) -> Library | None:
    """The library whose one-pass row-wise ops a CPU model of this compute dtype uses, if any."""
    if dtype == torch.bfloat16:
        return library() if native_ops() else None
    if dtype == torch.float32:
        return library_f32() if native_f32() else None
    return None
