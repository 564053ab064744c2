"""Batch-invariant operators: a token's result depends on its own inputs only.

In the default kernels a row's result depends on the shape of the call it is part of: a GEMM
library picks its kernel (and so its summation order) by the number of rows — on this MKL a
1-row float32 matmul gives other bits than the same row inside a 4-row one — and the flash
attention kernel splits keys into blocks by the context length, so a query attending a context that
was cached, or chunked differently, or batched with other sequences, rounds differently. Greedy
16-bit outputs then differ between cache on and off.

Here every call has a fixed shape, whatever the batch:

- **Linears** run in tiles of exactly ``ROW_TILE`` rows (the last one zero-padded): the same GEMM
  shape for a decode row, a prefill row, one sequence or a batch of them.
- **Attention** cuts each context into *pieces* of ``PIECE_TOKENS`` keys at fixed absolute
  positions ``[j*P, (j+1)*P)``, padded to P. Queries that attend a piece go through the flash kernel
  in tiles of ``QUERY_TILE`` queries (one call per piece, tiles stacked as the batch, the piece's
  K/V shared by a stride-0 view): the kernel's blocking depends on its fixed [tile, piece] shape
  only. Each query's per-piece results (float32 output and log-sum-exp) are merged in order
  j = 0, 1, ... by the exact log-sum-exp rule. Cached and fresh context are read the same way (from
  the KV cache, after this step's write), so whether a prefix came from the cache cannot matter.

- **Transcendental pointwise ops** (exp, SiLU, GELU) are the subtle one: ATen runs the body of a
  tensor through SIMD code (SLEEF) and the last few elements, and those at each thread's chunk
  boundary, through scalar libm, which rounds differently — so an element's bits depended on where
  it sat in the tensor (found by this mode's tests: decode rows differed alone and in a batch).
  ``pointwise`` feeds them in single-threaded chunks whose sizes are multiples of every SIMD step:
  every element takes the SIMD path.

- **Norms** run on the same 32-row tiles: on CPUs a row's reduction is the same alone or in a
  batch (measured), but a GPU's reduction kernel picks its thread split by the number of rows.

What stays batch-dependent is only which rows share a call, and no row reads another's values.
Arithmetic pointwise ops (+, *, /, sqrt: correctly rounded either way), embeddings and the
sampler's per-row log-softmax are batch-invariant already (on CPUs: tested).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from promptcache.model.attention import AttentionMetadata, slots_after, write_kv

ROW_TILE = 32  # rows per linear GEMM; measured: 1.4-1.7x prefill cost, 2-7x decode matmul cost
PIECE_TOKENS = 256  # keys per attention piece (a multiple of every block size up to 256)
QUERY_TILE = 8  # queries per attention call row-block; a lone decode query is padded to this
TILE_BATCH = 8  # portable path: query tiles per batched matmul (a fixed batch count)


# elements per pointwise call: under ATen's parallel grain (32768: one thread) and a multiple of the
# widest SIMD loop step (2 x 32 16-bit lanes), so no element falls to the scalar tail loop
POINTWISE_CHUNK = 16384
_SIMD_STEP = 64


def pointwise(fn: Callable[..., torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
    """``fn(*xs)`` for an elementwise ``fn`` of same-shaped tensors, every element on the SIMD path."""
    shape, numel = xs[0].shape, xs[0].numel()
    pad = -numel % _SIMD_STEP
    flat = [torch.nn.functional.pad(x.reshape(-1), (0, pad)) for x in xs]
    chunks = [fn(*(f[i : i + POINTWISE_CHUNK] for f in flat)) for i in range(0, numel + pad, POINTWISE_CHUNK)]
    return torch.cat(chunks)[:numel].view(shape)


def tiled_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for a row-wise ``fn``, computed on tiles of exactly ``ROW_TILE`` rows (the last one
    zero-padded), so every call has one shape whatever the batch. x: [M, ...] -> [M, ...]."""
    num_rows = x.shape[0]
    pad = -num_rows % ROW_TILE
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    tiles = [fn(x[i : i + ROW_TILE]) for i in range(0, x.shape[0], ROW_TILE)]
    return torch.cat(tiles)[:num_rows] if len(tiles) > 1 or pad else tiles[0]


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` computed in fixed ``ROW_TILE``-row GEMMs. x: [M, K] -> [M, N]."""
    return tiled_rows(lambda t: F.linear(t, weight, bias), x)


@dataclass(frozen=True)
class _Piece:
    index: int  # j: keys at absolute positions [j*P, j*P + num_keys)
    num_keys: int  # real keys; the rest of the P are padding (masked, and zeroed: never NaN garbage)
    slots: torch.Tensor  # [P] cache slots, zero-padded past the context
    tokens: torch.Tensor  # [n_tiles * QUERY_TILE] batch rows of the queries, padded with num_tokens
    mask: torch.Tensor  # [n_tiles, 1, QUERY_TILE * G, P] additive causal mask (0 / -inf)


@dataclass(frozen=True)
class _Plan:
    pieces: list[_Piece]  # sorted by index: the merge goes in position order


def _plan(attn: AttentionMetadata, group: int, piece_tokens: int, device: torch.device) -> _Plan:
    """Which queries attend which piece; identical pieces of sequences sharing cached blocks are one."""
    by_key: dict[tuple[int, ...], tuple[int, list[int], list[int]]] = {}
    for i in range(attn.num_seqs):
        first, last, ctx = attn.query_start_loc[i], attn.query_start_loc[i + 1], attn.seq_lens[i]
        slots = slots_after(attn.context_runs[i], 0)  # [ctx] in position order
        for j in range(-(-ctx // piece_tokens)):
            lo = j * piece_tokens
            key = tuple(slots[lo : lo + piece_tokens])
            entry = by_key.setdefault(key, (j, [], []))
            for t in range(first, last):
                pos = ctx - (last - t)
                if pos >= lo:  # this query sees at least the piece's first key
                    entry[1].append(t)
                    entry[2].append(pos)
    pieces: list[_Piece] = []
    for key, (j, tokens, positions) in by_key.items():
        pad = -len(tokens) % QUERY_TILE
        lo = j * piece_tokens
        tokens = tokens + [attn.slot_mapping.shape[0]] * pad  # padding rows read a zero query
        positions = positions + [lo] * pad  # ... and see the piece's first key only (no NaN)
        query_pos = torch.tensor(positions).view(-1, QUERY_TILE, 1).repeat_interleave(group, dim=1)
        key_pos = torch.arange(lo, lo + piece_tokens).view(1, 1, -1)
        mask = torch.zeros(query_pos.shape[0], QUERY_TILE * group, piece_tokens)
        mask.masked_fill_(key_pos > query_pos, float("-inf"))
        piece_slots = torch.zeros(piece_tokens, dtype=torch.long)
        piece_slots[: len(key)] = torch.tensor(key, dtype=torch.long)
        pieces.append(_Piece(j, len(key), piece_slots.to(device), torch.tensor(tokens, device=device),
                             mask.unsqueeze(1).to(device)))
    pieces.sort(key=lambda p: p.index)  # stable: merge order is position order
    return _Plan(pieces)


def _piece_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, cpu_kernels: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-shape attention of query tiles over one piece: (out [n, kvh, L, d], lse [n, kvh, L])."""
    if cpu_kernels:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)[:2]
        return out, lse
    # other devices: the same math in plain ops (no fused kernel returns the log-sum-exp portably),
    # in batches of exactly TILE_BATCH tiles: a GPU BLAS may pick its kernel by the batch count
    n = q.shape[0]
    pad = -n % TILE_BATCH
    if pad:
        q = torch.cat([q, q.new_zeros(pad, *q.shape[1:])])
        mask = torch.cat([mask, mask[:1].expand(pad, *mask.shape[1:])])
    outs, lses = [], []
    for i in range(0, n + pad, TILE_BATCH):
        qb, mb = q[i : i + TILE_BATCH], mask[i : i + TILE_BATCH]
        kb, vb = k[:1].expand(TILE_BATCH, -1, -1, -1), v[:1].expand(TILE_BATCH, -1, -1, -1)
        scores = torch.matmul(qb, kb.transpose(-1, -2)) * scale + mb  # [B, kvh, L, P]
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), vb))
        lses.append(lse)
    return torch.cat(outs)[:n], torch.cat(lses)[:n]


def deterministic_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    piece_tokens: int = PIECE_TOKENS,
    cpu_kernels: bool | None = None,
) -> torch.Tensor:
    """Store this step's K/V, then attend every query over its context in fixed pieces.

    q: [T, H, d]; k, v: [T, kvh, d]; returns [T, H, d] in q's dtype. Accumulates in float32.
    ``cpu_kernels`` as in ``paged_attention`` (False: the portable path, plain matmuls).
    """
    use_cpu = q.device.type == "cpu" if cpu_kernels is None else cpu_kernels
    write_kv(kv_cache, k, v, attn.slot_mapping)
    num_tokens, num_heads, d = q.shape
    kvh = kv_cache.shape[1]
    group = num_heads // kvh
    plan = attn.deterministic_plan
    if not isinstance(plan, _Plan):
        plan = attn.deterministic_plan = _plan(attn, group, piece_tokens, q.device)
    # queries as [T + 1, kvh, G, d] float32, the extra row is the zero query of padding rows
    qf = torch.cat([q.float(), q.new_zeros(1, num_heads, d, dtype=torch.float32)]).view(-1, kvh, group, d)
    # pieces in position order, merged into a running result as each index j completes: memory is
    # O(tokens), whatever the context length, and every query merges j = 0, 1, ... in that order
    acc_o: torch.Tensor | None = None
    acc_l: torch.Tensor | None = None
    for _, same_index in itertools.groupby(plan.pieces, key=lambda p: p.index):
        outs = qf.new_zeros(num_tokens + 1, kvh, group, d)
        lses = qf.new_full((num_tokens + 1, kvh, group), float("-inf"))
        for piece in same_index:
            o, lse = _attend_piece(qf, kv_cache, piece, scale, use_cpu)
            outs.index_copy_(0, piece.tokens, o)  # padding rows all land on row T
            lses.index_copy_(0, piece.tokens, lse)
        acc_o, acc_l = _merge_in(acc_o, acc_l, outs, lses)
    assert acc_o is not None
    return acc_o[:num_tokens].reshape(num_tokens, num_heads, d).to(q.dtype)


def _attend_piece(
    qf: torch.Tensor, kv_cache: torch.Tensor, piece: _Piece, scale: float, use_cpu: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One piece for its query tiles: (out [rows, kvh, G, d], lse [rows, kvh, G]), float32."""
    _, kvh, group, d = qf.shape
    n_tiles = piece.mask.shape[0]
    k_piece = kv_cache[0].index_select(1, piece.slots).float().unsqueeze(0)  # [1, kvh, P, d]
    v_piece = kv_cache[1].index_select(1, piece.slots).float().unsqueeze(0)
    k_piece[:, :, piece.num_keys :] = 0.0  # masked keys must still be finite: 0 * NaN is NaN
    v_piece[:, :, piece.num_keys :] = 0.0
    qt = qf.index_select(0, piece.tokens).view(n_tiles, QUERY_TILE, kvh, group, d)
    qt = qt.permute(0, 2, 1, 3, 4).reshape(n_tiles, kvh, QUERY_TILE * group, d)
    shape = (n_tiles, -1, -1, -1)
    o, lse = _piece_attention(qt, k_piece.expand(shape), v_piece.expand(shape), piece.mask, scale, use_cpu)
    o = o.view(n_tiles, kvh, QUERY_TILE, group, d).permute(0, 2, 1, 3, 4).reshape(-1, kvh, group, d)
    lse = lse.view(n_tiles, kvh, QUERY_TILE, group).permute(0, 2, 1, 3).reshape(-1, kvh, group)
    return o, lse


def _merge_in(
    acc_o: torch.Tensor | None, acc_l: torch.Tensor | None, outs: torch.Tensor, lses: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge piece index j's results into the running ones (log-sum-exp rule, float32). A query
    without piece j merges (0, -inf): exactly a no-op."""
    if acc_o is None or acc_l is None:
        return outs, lses
    lse = pointwise(torch.logaddexp, acc_l, lses)
    w_acc, w_new = pointwise(torch.exp, acc_l - lse), pointwise(torch.exp, lses - lse)
    return acc_o * w_acc.unsqueeze(-1) + outs * w_new.unsqueeze(-1), lse
