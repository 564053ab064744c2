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
extra copy costs half a table. Deterministic mode keeps its fixed-row-tile ``F.linear`` (but for
the bf16 panels below, batch-invariant as they are).

Float32 math on a bf16 checkpoint with our float32 kernels (CPUs without native bf16) skips oneDNN:
each linear keeps only its bf16 values, packed in 16-output panels that ``linear_w16`` (ops_f32.c)
multiplies by, converting as it reads. Half the memory of float32 weights and half the bytes per
matmul; on a 2-core AVX2 EPYC, smollm2-135m's 30 layers of linears + head with the weights cold:
1 row 49.9 -> 19.3 ms, 8 rows 76.6 -> 32.2, 32 rows 117 -> 86, 128 rows 331 -> 298, 2,048 rows
(no head) 3.49 -> 3.23 s against oneDNN's packed float32 (``scripts/linear_microbench.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from promptcache.model.native_lib import pack_w16
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


def _panels(weight: torch.Tensor, embed_dtype: torch.dtype | None, lib: object) -> torch.Tensor | None:
    """A float32 linear's bf16 values (exact: a bf16 checkpoint) in ``lib.linear_w16``'s panels, where
    our float32 library runs; None otherwise."""
    if lib is None or embed_dtype != torch.bfloat16:
        return None
    narrow = weight.to(torch.bfloat16)
    if weight.dtype != torch.bfloat16 and not torch.equal(narrow.float(), weight):
        return None
    return pack_w16(narrow)


def prepack_linears(model: CausalLM, embed_dtype: torch.dtype | None = None, w16_lib: object = None,
                    deterministic: bool = False) -> int:
    """Pack every linear of a CPU model that is not row-tiled; returns how many were packed (0 where
    oneDNN is unavailable and ``w16_lib`` is not given). ``embed_dtype``: the 16-bit dtype whose
    values float32 weights hold; a tied embedding table is then stored in it once its head is packed.
    ``w16_lib``: our float32 library, where it runs; with bf16 values in float32 weights each linear
    then keeps only those, in the panels its ``linear_w16`` multiplies by (half the memory of the
    float32 weights, half the bytes to read per matmul), instead of oneDNN's float32 packing.
    ``deterministic``: only those panels (a row's result does not depend on the rows beside it, so
    they replace the row tiles); other linears stay row-tiled."""
    embed = model.embed.weight
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, Linear) or module.row_tiled != deterministic:
                continue
            if module.weight.device.type != "cpu":
                continue
            if module.packed is not None or module.w16 is not None:  # packed already (a second call)
                continue
            panels = _panels(module.weight.detach(), embed_dtype, w16_lib)
            if panels is not None:
                module.w16, module.w16_lib, module.row_tiled = panels, w16_lib, False
            elif deterministic:
                continue
            elif torch.backends.mkldnn.is_available() and (packed := _pack(module)) is not None:
                module.packed = packed
            else:
                continue
            count += 1
            if module.weight is embed:  # tied: the embedding keeps the plain table (its lookups need it)
                if embed_dtype is not None and embed.dtype == torch.float32 and embed_dtype != embed.dtype:
                    narrow = embed.to(embed_dtype)
                    if torch.equal(narrow.float(), embed):  # exact: the values are embed_dtype's
                        model.embed.weight = module.weight = nn.Parameter(narrow, requires_grad=False)
                continue
            module.weight = nn.Parameter(module.weight.new_empty(0), requires_grad=False)  # free the plain copy
    return count
