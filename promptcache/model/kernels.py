"""The attention kernels the step plan (``model/cascade.py``) calls. Each takes
``(q [B, h, m, d], k [B, h', n, d], v, scale, additive mask or None, causal)`` and returns
``(out [B, h, m, d], lse [B, h, m])``, the log-sum-exp the plan merges parts by:

- ``cpu_flash``: PyTorch's CPU flash kernel (h' == h);
- ``native_flash``: our bf16 or float32 kernel (``model/native.py``) where one takes the call,
  ``cpu_flash`` otherwise; grouped heads (h' dividing h), per-sequence key counts and slot indices;
- ``math_attention``: plain matmuls with a float32 softmax, any device (h' == h).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from promptcache.model import native

# (q [B, h, m, d], k [B, h, n, d], v, scale, additive mask or None, causal) -> (out [B, h, m, d], lse [B, h, m])
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, "torch.Tensor | None", bool],
                  tuple[torch.Tensor, torch.Tensor]]


def cpu_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
              causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, is_causal=causal, attn_mask=mask, scale=scale)[:2]
    return out, lse


def native_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
                 causal: bool = False, kv_lens: torch.Tensor | None = None, kv_idx: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Our kernel (``model/native.py``) where one takes the call — bf16 (head size a multiple of 32)
    or float32 queries over float32 or bf16 K/V (a multiple of 16), no mask — PyTorch's CPU flash
    kernel otherwise, with the same meaning. K/V may have fewer
    heads than q (grouped query heads read their KV head in place, nothing repeated). ``kv_lens`` [B]
    instead of ``mask``: sequence b attends to its first kv_lens[b] keys. ``kv_idx`` [B, N]: k, v
    are a paged cache's ``[kvh, slots, d]`` and sequence b's keys are at those slots (read in place
    natively, gathered for the fallback)."""
    lib = native.library_for(q.dtype) if mask is None and k.dtype == v.dtype else None
    if lib is not None and (k.dtype == q.dtype or k.dtype == torch.bfloat16):  # float32 math reads a bf16 cache
        res = lib.flash(q, k, v, scale, causal, kv_lens=kv_lens, kv_idx=kv_idx)
        if res is not None:
            return res
    if kv_idx is not None:  # [kvh, slots, d] -> [B, kvh, N, d], in q's dtype
        b, n = kv_idx.shape
        kvh, d = k.shape[0], k.shape[-1]
        k = k.index_select(1, kv_idx.view(-1)).view(kvh, b, n, d).transpose(0, 1).to(q.dtype)
        v = v.index_select(1, kv_idx.view(-1)).view(kvh, b, n, d).transpose(0, 1).to(q.dtype)
    # PyTorch's kernel aligns a causal mask top-left, and gives a row with no keys lse 0, not -inf:
    # the plan never asks for the latter (every tail holds its own token); the former is a mask here
    assert not (causal and kv_lens is not None)
    if causal and q.shape[2] != k.shape[2]:  # query i of m sees keys [0, n - m + i]: aligned at the end
        m, n = q.shape[2], k.shape[2]
        assert mask is None and m < n, "causal over fewer keys than queries, or beside a mask: no caller's"
        hidden = torch.ones(m, n, dtype=torch.bool, device=q.device).triu(n - m + 1)
        mask = torch.zeros(1, 1, m, n, dtype=q.dtype, device=q.device).masked_fill_(hidden, float("-inf"))
        causal = False
    if kv_lens is not None:  # the same keys as an additive mask [B, 1, 1, N]
        mask = torch.full((q.shape[0], 1, 1, k.shape[2]), float("-inf"), dtype=q.dtype)
        mask.masked_fill_(torch.arange(k.shape[2]) < kv_lens.view(-1, 1, 1, 1), 0.0)
    if k.shape[1] != q.shape[1]:
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return cpu_flash(q, k, v, scale, mask, causal)


MATH_SCORES_MAX = 1 << 25  # score elements per math_attention call (128 MiB in float32): longer query runs are split


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
                   causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its log-sum-exp in plain ops (any device): scores come out of the matmul in the
    inputs' dtype, the softmax runs in float32. Queries are taken in slices so one call's scores stay
    under ``MATH_SCORES_MAX`` elements (a long chunk over a long context must not need gigabytes)."""
    *batch, m, _ = q.shape
    n = k.shape[-2]
    step = max(1, MATH_SCORES_MAX // max(1, n * math.prod(batch)))
    outs, lses = [], []
    for a in range(0, m, step):
        b = min(m, a + step)
        scores = torch.matmul(q[..., a:b, :], k.transpose(-1, -2)).float() * scale  # [B, h, b - a, n]
        if mask is not None:
            scores = scores + (mask if mask.shape[-2] == 1 else mask[..., a:b, :])
        if causal:  # query i (of m, the last m of n positions) sees keys [0, n - m + i]
            hidden = torch.ones(b - a, n, dtype=torch.bool, device=q.device).triu(n - m + 1 + a)
            scores = scores.masked_fill(hidden, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.matmul(torch.exp(scores - lse.unsqueeze(-1)).to(v.dtype), v))
        lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)
