"""Linear weights packed once, at load, into oneDNN's own blocked layout (CPUs).

``F.linear`` hands oneDNN a plain ``[out, in]`` weight, which it reorders into its blocked layout
on every call. That costs little next to a 2,048-row prefill GEMM but dominates small ones: on a
2-core EPYC with avx512_bf16, a ``[3072, 576]`` bf16 linear took 0.17 ms for 1 row and 0.41 ms for
7 rows through ``F.linear``, 0.06 and 0.08 ms on a packed weight; in float32, 2,048 rows took 43.9
vs 19.7 ms. The packed call runs the same oneDNN kernels: bf16 results are bit-identical to
``F.linear``'s. Packing happens only where it is checked to agree (a probe per linear) and the plain copy is freed
(no second copy of the weights) — except for an lm_head tied to the embedding: the embedding's
lookups need the plain table, so the head gets a packed copy of its own. That copy is worth its
memory: the head is the largest matmul of a decode step (``[49152, 576]`` for smollm2-135m; float32
on a 2-core AVX2 EPYC: 16.9 -> 9.3 ms for 1 row, 45.4 -> 13.1 ms for 8, 78.2 -> 26.5 ms for 32).
Where float32 weights hold 16-bit values (a bf16 checkpoint on a CPU without native bf16), the
embedding table is kept in that 16-bit dtype (exact; rows are upcast as they are looked up), so the
extra copy costs half a table. Deterministic mode keeps its fixed-row-tile ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from promptcache.model.transformer import CausalLM, Linear

PROBE_ROWS = 5


def _pack(linear: Linear) -> torch.Tensor | None:
    weight = linear.weight.detach()
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        probe = torch.randn(PROBE_ROWS, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, linear.bias, "none", [], "")
    except (RuntimeError, NotImplementedError):
        return None  # this CPU or dtype has no oneDNN path (e.g. fp16 without avx512_fp16 / AMX)
    want = F.linear(probe, weight, linear.bias)
    tol = 1e-4 if weight.dtype == torch.float32 else 0.0  # 16-bit: the same kernel, the same bits
    return packed if torch.allclose(got.float(), want.float(), rtol=tol, atol=tol) else None


def _keep_w16(module: Linear, weight: torch.Tensor, embed_dtype: torch.dtype | None, lib: object) -> None:
    """Keep a float32 linear's bf16 values (exact: a bf16 checkpoint) for inputs of a few rows, which
    ``lib.linear_w16`` multiplies by reading half the bytes (``Linear.w16``)."""
    if lib is None or embed_dtype != torch.bfloat16 or weight.shape[1] % 8 != 0:
        return
    narrow = weight.to(torch.bfloat16).contiguous()  # the tied head: the embedding's table itself
    if weight.dtype == torch.bfloat16 or torch.equal(narrow.float(), weight):
        module.w16, module.w16_lib = narrow, lib


def prepack_linears(model: CausalLM, embed_dtype: torch.dtype | None = None, w16_lib: object = None) -> int:
    """Pack every linear of a CPU model that is not row-tiled; returns how many were packed (0 where
    oneDNN is unavailable). ``embed_dtype``: the 16-bit dtype whose values float32 weights hold; a
    tied embedding table is then stored in it once its head is packed. ``w16_lib``: our float32
    library, where it runs; with bf16 values in float32 weights each linear then also keeps them in
    bf16 for few-row inputs (decode steps: half the weight bytes to read; the tied head reuses the
    embedding's bf16 table, the other linears cost half their float32 size again)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    embed = model.embed.weight
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, Linear) or module.row_tiled or module.packed is not None:
                continue
            if module.weight.device.type != "cpu":
                continue
            packed = _pack(module)
            if packed is None:
                continue
            module.packed = packed
            count += 1
            if module.weight is embed:  # tied: the embedding keeps the plain table (its lookups need it)
                if embed_dtype is not None and embed.dtype == torch.float32 and embed_dtype != embed.dtype:
                    narrow = embed.to(embed_dtype)
                    if torch.equal(narrow.float(), embed):  # exact: the values are embed_dtype's
                        model.embed.weight = module.weight = nn.Parameter(narrow, requires_grad=False)
                _keep_w16(module, module.weight.detach(), embed_dtype, w16_lib)
                continue
            _keep_w16(module, module.weight.detach(), embed_dtype, w16_lib)
            module.weight = nn.Parameter(module.weight.new_empty(0), requires_grad=False)  # free the plain copy
    return count
