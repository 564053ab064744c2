"""The ctypes face of a compiled kernel library (``model/native.py`` builds and loads it): one method
per op, each checking its tensors' dtypes, shapes and strides before handing their pointers over —
the C code trusts what it is given.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import record_function


class Library:
    """One compiled library: bf16 (``BF16``: bf16 tensors throughout) or float32 (``F32``: float32
    tensors; its flash kernel also reads a bf16 KV cache). The same ops, the same signatures."""

    def __init__(self, path: Path, dtype: torch.dtype = torch.bfloat16) -> None:
        torch.get_num_threads()  # torch's OpenMP runtime is loaded first: the library reuses it
        self.lib = ctypes.CDLL(str(path))
        self.dtype = dtype
        self.sfx = "bf16" if dtype == torch.bfloat16 else "f32"
        p, i64, arr = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)
        f32, i32 = ctypes.c_float, ctypes.c_int
        # the float32 kernel takes one more argument before the thread count: whether K/V are bf16
        extra = [i32] if self.sfx == "f32" else []
        signatures = {
            "flash": ([p, p, p, p, p, i64, i64, i64, i64, i64, i64, arr, arr, arr, arr, arr, p, p, f32, i32, *extra,
                       i32], ctypes.c_int),
            "rms_norm": ([p, i64, p, p, i64, i64, f32, i32], None),
            "add_rms_norm": ([p, p, p, p, p, i64, i64, f32, i32], None),
            "silu_mul": ([p, i64, p, i64, i64, i32], None),
            "rope": ([p, i64, i64, p, p, i64, p, i64, i64, i64, i32], None),
            "write_kv": ([p, i64, i64, p, i64, i64, p, p, i64, i64, p, i64, i64, i64, i32], None),
        }
        if self.sfx == "f32":  # float32 math on bf16 weights
            signatures["linear_w16"] = ([p, i64, p, p, p, i64, i64, i64, i64, i32], None)
        self.fn: dict[str, Callable[..., int | None]] = {}
        for name, (argtypes, restype) in signatures.items():
            fn = getattr(self.lib, f"pc_{name}_{self.sfx}")
            fn.argtypes, fn.restype = argtypes, restype
            self.fn[name] = fn

    def _call(self, name: str, *args: object) -> None:
        with _named(f"native::{name}_{self.sfx}"):  # named in torch profiler tables
            self.fn[name](*args, torch.get_num_threads())

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``s = x + delta`` and ``rms_norm(s)`` (as ``rms_norm``) in one pass: x, delta [T, H]."""
        x, delta = x.contiguous(), delta.contiguous()
        assert x.dtype == delta.dtype == weight.dtype == self.dtype and x.shape == delta.shape and x.dim() == 2
        assert weight.is_contiguous() and weight.shape == (x.shape[1],)
        total, out = torch.empty_like(x), torch.empty_like(x)
        self._call("add_rms_norm", x.data_ptr(), delta.data_ptr(), weight.data_ptr(), total.data_ptr(), out.data_ptr(),
                   x.shape[0], x.shape[1], eps)
        return total, out

    def linear_w16(self, x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ w.T + bias`` in float32 (float32 library) for a weight ``w`` [n, K] whose bf16 values
        ``pack_w16`` packed into ``panels``: x [M, K] float32 (rows of any stride, the last dim
        contiguous) -> [M, n] float32. A register-blocked GEMM reading half the bytes of a float32
        weight; each row's result is independent of the rows beside it."""
        m, k = x.shape
        # checked as errors, not asserts (``python -O`` drops those): the C code trusts these shapes
        if not (self.sfx == "f32" and x.dtype == torch.float32 and panels.dtype == torch.bfloat16 and x.stride(1) == 1
                and panels.is_contiguous() and panels.shape == ((n + 15) // 16, k, 16)):
            raise ValueError(f"linear_w16: x {tuple(x.shape)} {x.dtype}, panels {tuple(panels.shape)} "
                             f"{panels.dtype}, n {n}: expected float32 x with contiguous rows and pack_w16's "
                             f"panels of an [{n}, {k}] weight")
        if bias is not None and not (bias.dtype == torch.float32 and bias.is_contiguous() and bias.shape == (n,)):
            raise ValueError(f"linear_w16: bias {tuple(bias.shape)} {bias.dtype}: expected [{n}] float32")
        out = torch.empty(m, n, dtype=torch.float32)
        self._call("linear_w16", x.data_ptr(), x.stride(0), panels.data_ptr(),
                   bias.data_ptr() if bias is not None else None, out.data_ptr(), out.stride(0), m, n, k)
        return out

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE in one pass: x [T, heads, d] (any row / head strides), cos, sin [T, 1, d]
        -> ``x * cos + rotate_half(x) * sin`` [T, heads, d], contiguous."""
        t, heads, d = x.shape
        assert x.dtype == cos.dtype == sin.dtype == self.dtype and d % 2 == 0
        assert x.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride() == sin.stride()
        assert cos.shape == sin.shape == (t, 1, d)
        out = torch.empty(t, heads, d, dtype=self.dtype)
        self._call("rope", x.data_ptr(), x.stride(0), x.stride(1), cos.data_ptr(), sin.data_ptr(), cos.stride(0),
                   out.data_ptr(), t, heads, d)
        return out

    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """``attention.write_kv``: k, v [T, kvh, d] into kv_cache [2, kvh, slots, d] at ``slots`` (the
        step's slot mapping: in range by construction, not checked per call)."""
        t, h, d = k.shape
        assert k.dtype == v.dtype == kv_cache.dtype == self.dtype and k.stride(-1) == v.stride(-1) == 1
        assert slots.dtype == torch.int64 and slots.is_contiguous() and kv_cache.stride(-1) == 1
        assert slots.shape == (t,) and v.shape == k.shape and kv_cache.shape[1] == h and kv_cache.shape[3] == d
        self._call("write_kv", k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(), v.stride(0), v.stride(1),
                   kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), kv_cache.stride(1), kv_cache.stride(2),
                   slots.data_ptr(), t, h, d)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [..., H] (rows of any stride, last dim contiguous), weight [H] -> contiguous, in one pass:
        ``weight * rms_norm(x.float()).to(x.dtype)``."""
        h = x.shape[-1]
        rows = x.reshape(-1, h)  # a view where it can be
        assert x.dtype == weight.dtype == self.dtype and rows.stride(-1) == 1 and weight.is_contiguous()
        assert weight.shape == (h,)
        out = torch.empty(rows.shape, dtype=self.dtype)
        self._call("rms_norm", rows.data_ptr(), rows.stride(0), weight.data_ptr(), out.data_ptr(), rows.shape[0], h,
                   eps)
        return out.view(x.shape)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [T, 2I] -> ``silu(gate) * up`` [T, I] in one pass."""
        t, two_i = gate_up.shape
        assert gate_up.dtype == self.dtype and gate_up.stride(-1) == 1 and two_i % 2 == 0
        out = torch.empty(t, two_i // 2, dtype=self.dtype)
        self._call("silu_mul", gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), t, two_i // 2)
        return out

    def flash(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
              num_threads: int | None = None, kv_lens: torch.Tensor | None = None,
              kv_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """q [B, H, M, d], k, v [B, kvh, N, d] (any strides, last dim contiguous; bf16 library: all
        bf16, head size a multiple of 32; float32 library: q float32, k, v float32 or bf16, a multiple
        of 16) -> (out [B, H, M, d] in q's dtype, lse [B, H, M] float32), or None for arguments it does
        not take. ``kv_lens``: [B] int64, the keys of each sequence (the rest of its N are not read).
        ``kv_idx``: [B, N] int64, the rows of k, v holding each sequence's keys (then k, v are
        ``[kvh, slots, d]``: a paged cache read in place, no gather). Lengths and slots come from the
        step's plan, in range by construction: they are not checked per call (a check is a sync).
        Not both ``causal`` and ``kv_lens`` (no caller needs it, and "causal" over a shortened key
        range has two readings: the kernel would align it at each sequence's end)."""
        b, h, m, d = q.shape
        assert not (causal and kv_lens is not None)
        assert q.dtype == self.dtype and k.dtype == v.dtype
        assert k.dtype == self.dtype or (self.sfx == "f32" and k.dtype == torch.bfloat16)
        extra = (int(k.dtype == torch.bfloat16),) if self.sfx == "f32" else ()
        if kv_idx is not None:
            assert kv_idx.dtype == torch.int64 and kv_idx.is_contiguous() and kv_idx.shape[0] == b
            assert k.dim() == 3
            k, v = k.unsqueeze(0).expand(b, -1, -1, -1), v.unsqueeze(0).expand(b, -1, -1, -1)  # stride 0 over b
        kvh, n = k.shape[1], (k.shape[2] if kv_idx is None else kv_idx.shape[1])
        assert v.shape == k.shape and k.shape[0] == b and k.shape[-1] == d
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
            return None
        if kv_lens is not None:
            assert kv_lens.dtype == torch.int64 and kv_lens.is_contiguous() and kv_lens.shape == (b,)
        out = torch.empty(b, h, m, d, dtype=q.dtype)
        lse = torch.empty(b, h, m, dtype=torch.float32)
        strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (q, k, v, out)]
        lse_strides = (ctypes.c_int64 * 3)(*lse.stride())
        with _named(f"native::flash_{self.sfx}"):
            rc = self.fn["flash"](q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), b, h, kvh,
                                  m, n, d, *strides, lse_strides, kv_lens.data_ptr() if kv_lens is not None else None,
                                  kv_idx.data_ptr() if kv_idx is not None else None, scale, int(causal), *extra,
                                  num_threads or torch.get_num_threads())
        if rc == -2:
            raise MemoryError(f"flash_{self.sfx}: out of memory for its packed K/V")
        return (out, lse) if rc == 0 else None


def _named(name: str) -> contextlib.AbstractContextManager[object]:
    """A torch profiler range named ``name`` while a profiler runs (``native::*`` in its tables);
    nothing otherwise (a range costs ~20 us per call, 6 % of a decode step)."""
    return record_function(name) if torch._C._autograd._profiler_enabled() else contextlib.nullcontext()


# within a panel's 16 outputs at one k: 0, 8, 1, 9, ..., 7, 15 (ops_f32.c's pc_linear_w16_f32 unpacks
# each 32-bit word's halves into outputs j and j + 8)
_PANEL_ORDER = torch.arange(16).view(2, 8).t().reshape(-1)


def pack_w16(weight: torch.Tensor) -> torch.Tensor:
    """An ``[N, K]`` weight's bf16 values as ``linear_w16``'s panels ``[ceil(N / 16), K, 16]`` (outputs
    past N are zeros)."""
    n, k = weight.shape
    padded = torch.zeros((n + 15) // 16 * 16, k, dtype=torch.bfloat16)
    padded[:n] = weight
    return padded.view(-1, 16, k)[:, _PANEL_ORDER].transpose(1, 2).contiguous()


def unpack_w16(panels: torch.Tensor, n: int) -> torch.Tensor:
    """``pack_w16``'s inverse: the ``[n, K]`` bf16 weight."""
    k = panels.shape[1]
    plain = torch.empty(panels.shape[0], 16, k, dtype=panels.dtype)
    plain[:, _PANEL_ORDER] = panels.transpose(1, 2)
    return plain.view(-1, k)[:n]
