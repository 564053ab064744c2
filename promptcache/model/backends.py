"""Attention backends. The runner picks one per engine (by device and mode) and, once per step,
lets it build its plan into the step's ``AttentionMetadata``; every layer then reuses that plan.

| backend        | where                     | attention                                               |
| -------------- | ------------------------- | ------------------------------------------------------- |
| ``cpu-cascade``| CPU                       | model/cascade.py's plan, PyTorch's CPU flash kernel      |
| ``cpu-native`` | CPU: bf16 with AVX512-BF16, float32 on AVX2 | the same plan, in model/native.py's kernels |
| ``portable``   | any device (GPUs today)   | the same plan (contexts read in place), plain matmuls   |
| ``deterministic`` | any device, opt-in     | fixed 256-key pieces merged in order (model/deterministic.py) |
"""

from __future__ import annotations

from typing import Protocol

import torch

from promptcache.model import cascade as _cascade
from promptcache.model import cascade_plan as _plan
from promptcache.model import deterministic as _deterministic
from promptcache.model import kernels as _kernels
from promptcache.model import native
from promptcache.model.attention import AttentionMetadata, Backend, write_kv


class AttentionBackend(Backend, Protocol):
    """What the runner calls besides what the model does (``attention.Backend``: attend, write)."""

    name: str

    def prepare(self, attn: AttentionMetadata, num_heads: int, dtype: torch.dtype, device: torch.device) -> None:
        """Build this step's plan into ``attn`` (once; every layer reuses it)."""
        ...


class CascadeCPU:
    name = "cpu-cascade"
    grouped = False

    def write(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        _cascade.write(kv_cache, k, v, slots, self.grouped)

    def prepare(self, attn: AttentionMetadata, num_heads: int, dtype: torch.dtype, device: torch.device) -> None:
        attn.cascade_plan = _plan.plan_cascade(attn, dtype, device)

    def __call__(self, q, k, v, kv_cache, attn, scale):  # type: ignore[no-untyped-def]
        return _cascade.cascade_attention(q, k, v, kv_cache, attn, scale, _kernels.cpu_flash)


class CascadeNative(CascadeCPU):
    name = "cpu-native"
    grouped = True

    def prepare(self, attn: AttentionMetadata, num_heads: int, dtype: torch.dtype, device: torch.device) -> None:
        # every decode's tail in the one tail call, however long (read by slot, stopped at its length) —
        # while a tail's query heads fit one of the kernel's query blocks: past that (models with more
        # query heads per KV head) the kernel packs all tails up front, memory growing with tails x the
        # longest, so long tails keep calls of their own
        group = num_heads // max(1, int(attn.num_kv_heads))
        short = None if group <= native.query_block(dtype) else _plan.SHORT_CONTEXT
        # a chunk alone on its cached context in one causal call: the float32 kernel splits such a
        # call's keys when a few tokens' queries would leave threads idle; the bf16 one does not (yet),
        # so there it keeps the cached part's split call and the merge
        attn.cascade_plan = _plan.plan_cascade(attn, dtype, device, by_slot=True, short_context=short,
                                               whole_chunks=dtype == torch.float32)

    def __call__(self, q, k, v, kv_cache, attn, scale):  # type: ignore[no-untyped-def]
        return _cascade.cascade_attention(q, k, v, kv_cache, attn, scale, _kernels.native_flash, grouped=True)


class Portable:
    name = "portable"

    def write(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        write_kv(kv_cache, k, v, slots)

    def prepare(self, attn: AttentionMetadata, num_heads: int, dtype: torch.dtype, device: torch.device) -> None:
        attn.cascade_plan = _plan.plan_cascade(attn, dtype, device)

    def __call__(self, q, k, v, kv_cache, attn, scale):  # type: ignore[no-untyped-def]
        return _cascade.cascade_attention(q, k, v, kv_cache, attn, scale, _kernels.math_attention)


class Deterministic:
    name = "deterministic"

    def __init__(self, cpu_kernels: bool) -> None:
        self.cpu_kernels = cpu_kernels

    def write(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        write_kv(kv_cache, k, v, slots)

    def prepare(self, attn: AttentionMetadata, num_heads: int, dtype: torch.dtype, device: torch.device) -> None:
        group = num_heads // int(attn.num_kv_heads)
        attn.deterministic_plan = _deterministic._plan(attn, group, _deterministic.PIECE_TOKENS, device)

    def __call__(self, q, k, v, kv_cache, attn, scale):  # type: ignore[no-untyped-def]
        return _deterministic.deterministic_attention(q, k, v, kv_cache, attn, scale, cpu_kernels=self.cpu_kernels)


def pick_backend(device: torch.device, deterministic: bool, dtype: torch.dtype = torch.float32,
                 head_dim: int | None = None) -> AttentionBackend:
    """``head_dim``: the model's; our kernels decline some sizes (``native.takes_head_dim``), and a
    model whose every call would fall back is better off with PyTorch's kernel and its plan (by-slot
    plans send long tails to the one call: a fallback would gather and pad them)."""
    if deterministic:
        return Deterministic(cpu_kernels=device.type == "cpu")
    if device.type != "cpu":
        return Portable()
    native_kernel = (dtype == torch.bfloat16 and native.native_attention()) or (
        dtype == torch.float32 and native.native_f32())
    if native_kernel and (head_dim is None or native.takes_head_dim(dtype, head_dim)):
        return CascadeNative()
    return CascadeCPU()
