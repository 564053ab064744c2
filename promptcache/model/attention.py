"""Paged attention: K/V live in preallocated per-layer slot tensors; sequences address them by slot.

The model never sees a request or a block object. The engine hands it an ``AttentionMetadata``
(plain tensors and ints) as an argument of ``forward``; there is no module-level context.

Storage layout, per layer: ``kv_cache[2, num_slots, num_kv_heads, head_dim]`` where slot
``block_id * block_size + offset`` holds the token at ``offset`` in block ``block_id``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """What attention needs for one forward over a flat batch of tokens from several sequences.

    Tokens of sequence ``i`` are ``[query_start_loc[i], query_start_loc[i+1])`` in the batch; they
    are the *last* ``n_i`` tokens of a context of ``seq_lens[i]`` tokens, the earlier ones already
    in the cache at ``context_slots[i][:seq_lens[i] - n_i]``.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V is written
    query_start_loc: list[int]  # [num_seqs + 1]
    seq_lens: list[int]  # [num_seqs] context length including this step's tokens
    context_slots: list[torch.Tensor]  # per sequence [seq_len] int64 slots of the whole context
    _uniform_decode: bool | None = field(default=None, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def is_uniform_decode(self) -> bool:
        """Every sequence contributes exactly one query token (pure decode step)."""
        if self._uniform_decode is None:
            self._uniform_decode = len(self.query_start_loc) - 1 == self.query_start_loc[-1]
        return self._uniform_decode


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    # kv_cache: [2, num_slots, kvh, d]; k, v: [num_tokens, kvh, d] (cast to the cache's dtype)
    kv_cache[0].index_copy_(0, slots, k.to(kv_cache.dtype))
    kv_cache[1].index_copy_(0, slots, v.to(kv_cache.dtype))


def _as_stored(t: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
    """Fresh K/V rounded the way the cache stores them, so a request attends to the same values
    whether its context was computed now or read from the cache (cached == uncached, exactly)."""
    return t if t.dtype == kv_cache.dtype else t.to(kv_cache.dtype).to(t.dtype)


def _causal_suffix_mask(num_q: int, ctx: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # query i sits at absolute position ctx - num_q + i and sees keys [0, that position].
    # An additive float mask: on CPU a boolean mask drops SDPA to a path about 2x slower.
    q_pos = torch.arange(ctx - num_q, ctx, device=device).unsqueeze(1)  # [num_q, 1]
    k_pos = torch.arange(ctx, device=device).unsqueeze(0)  # [1, ctx]
    mask = torch.zeros(num_q, ctx, dtype=dtype, device=device)
    return mask.masked_fill_(k_pos > q_pos, float("-inf"))  # [num_q, ctx]


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # q: [n, H, d]; k, v: [ctx, kvh, d] -> [n, H, d]
    num_q, ctx = q.shape[0], k.shape[0]
    # 4-D [1, heads, len, d]: SDPA's fused CPU kernel only takes batched input (3-D falls back to math)
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    gqa = qh.shape[1] != kh.shape[1]
    if num_q == ctx:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    elif num_q == 1:
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=gqa)
    else:
        mask = _causal_suffix_mask(num_q, ctx, q.dtype, q.device)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)


def _attend_decode_batch(
    q: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionMetadata, scale: float
) -> torch.Tensor:
    """One query per sequence: pad contexts to the longest and run one batched SDPA."""
    # q: [B, H, d]
    num_seqs, max_ctx = attn.num_seqs, max(attn.seq_lens)
    kvh, d = kv_cache.shape[2], kv_cache.shape[3]
    slots = torch.zeros(num_seqs, max_ctx, dtype=torch.long, device=q.device)
    mask = torch.full((num_seqs, 1, 1, max_ctx), float("-inf"), dtype=q.dtype, device=q.device)
    for i, s in enumerate(attn.context_slots):
        slots[i, : s.shape[0]] = s
        mask[i, 0, 0, : s.shape[0]] = 0.0
    flat = slots.view(-1)
    k = kv_cache[0].index_select(0, flat).to(q.dtype).view(num_seqs, max_ctx, kvh, d).transpose(1, 2)
    v = kv_cache[1].index_select(0, flat).to(q.dtype).view(num_seqs, max_ctx, kvh, d).transpose(1, 2)
    qh = q.unsqueeze(2)  # [B, H, 1, d]
    gqa = qh.shape[1] != kvh
    out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.squeeze(2)  # [B, H, d]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Store this step's K/V, then attend every query over its sequence's full context.

    q: [num_tokens, H, d]; k, v: [num_tokens, kvh, d]; returns [num_tokens, H, d].
    """
    write_kv(kv_cache, k, v, attn.slot_mapping)
    if attn.is_uniform_decode and attn.num_seqs > 1:
        return _attend_decode_batch(q, kv_cache, attn, scale)
    outs = []
    for i in range(attn.num_seqs):
        start, end = attn.query_start_loc[i], attn.query_start_loc[i + 1]
        num_q, ctx = end - start, attn.seq_lens[i]
        if num_q == ctx:
            # nothing cached before this chunk: the fresh K/V are the whole context, skip the gather
            k_ctx, v_ctx = _as_stored(k[start:end], kv_cache), _as_stored(v[start:end], kv_cache)
        else:
            slots = attn.context_slots[i]
            k_ctx = kv_cache[0].index_select(0, slots).to(q.dtype)
            v_ctx = kv_cache[1].index_select(0, slots).to(q.dtype)
        outs.append(_attend_one(q[start:end], k_ctx, v_ctx, scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
