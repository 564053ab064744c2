"""Paged attention: K/V live in preallocated per-layer slot tensors; sequences address them by slot.

The model never sees a request or a block object. The engine hands it an ``AttentionMetadata``
(plain tensors and ints) as an argument of ``forward``; there is no module-level context.

Storage layout, per layer: ``kv_cache[2, num_kv_heads, num_slots, head_dim]`` (head-major), where
slot ``block_id * block_size + offset`` holds the token at ``offset`` in block ``block_id``.
Head-major means a run of consecutive slots is a strided *view* ``[kv_heads, run, head_dim]`` that
attention reads in place: a decode token's context is its first run, read in place (one call for
all decode tokens that share it: cascade attention), plus a short tail gathered with everyone
else's, the two merged by their log-sum-exp. A prefill chunk over a cached context reads each
cached run in place too, and merges it with the chunk's causal attention over its fresh K/V: on
CPU nothing is gathered (the portable path GPUs take still gathers a fragmented context whole).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Run = tuple[int, int]  # (first slot, number of slots): consecutive slots in token order


@dataclass
class AttentionMetadata:
    """What attention needs for one forward over a flat batch of tokens from several sequences.

    Tokens of sequence ``i`` are ``[query_start_loc[i], query_start_loc[i+1])`` in the batch; they
    are the *last* ``n_i`` tokens of a context of ``seq_lens[i]`` tokens whose slots, in token
    order, are the runs ``context_runs[i]``.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V is written
    query_start_loc: list[int]  # [num_seqs + 1]
    seq_lens: list[int]  # [num_seqs] context length including this step's tokens
    context_runs: list[list[Run]]  # per sequence, covering exactly seq_lens[i] slots
    # the decode plan is the same in every layer: built by the first, reused by the others
    num_kv_heads: int = 0  # of the KV storage (plans need it before any layer runs)
    # the backend the runner picked (model/backends.py); the model refuses to run without one
    backend: Callable[..., torch.Tensor] | None = field(default=None, repr=False)
    # per-step plans a backend builds once, before the first layer, and every layer reuses
    decode_plan: _DecodePlan | None = field(default=None, repr=False)
    deterministic_plan: object | None = field(default=None, repr=False)  # model/deterministic.py's

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    # kv_cache: [2, kvh, num_slots, d]; k, v: [num_tokens, kvh, d] (cast to the cache's dtype)
    kv_cache[0].index_copy_(1, slots, k.transpose(0, 1).to(kv_cache.dtype))
    kv_cache[1].index_copy_(1, slots, v.transpose(0, 1).to(kv_cache.dtype))


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


def _attend_contiguous(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # q: [n, H, d]; k, v: [kvh, ctx, d] -> [n, H, d]
    num_q, ctx = q.shape[0], k.shape[1]
    # 4-D [1, heads, len, d]: SDPA's fused CPU kernel only takes batched input (3-D falls back to math)
    qh, kh, vh = q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    gqa = qh.shape[1] != kh.shape[1]
    if num_q == ctx:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    elif num_q == 1:
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=gqa)
    else:
        mask = _causal_suffix_mask(num_q, ctx, q.dtype, q.device)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)


def _flash(q: torch.Tensor, kv_cache: torch.Tensor, run: Run, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of folded queries ``[1, kvh, m, d]`` over one run, in place; (out, log-sum-exp)."""
    start, length = run
    k = kv_cache[0, :, start : start + length].to(q.dtype).unsqueeze(0)  # [1, kvh, run, d]
    v = kv_cache[1, :, start : start + length].to(q.dtype).unsqueeze(0)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)[:2]
    return out, lse  # [1, kvh, m, d], [1, kvh, m]


def _merge(
    acc: tuple[torch.Tensor, torch.Tensor] | None, part: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets from their outputs and log-sum-exps (exact).

    The log-sum-exps are float32 (the flash kernel's) whatever the outputs' dtype; the weighted sum
    is taken in float32 and rounded once, back to the outputs' dtype (a 16-bit caller gets 16 bits).
    """
    if acc is None:
        return part
    (o1, l1), (o2, l2) = acc, part
    lse = torch.logaddexp(l1, l2)
    out = o1.float() * torch.exp(l1 - lse).unsqueeze(-1) + o2.float() * torch.exp(l2 - lse).unsqueeze(-1)
    return out.to(o1.dtype), lse


@dataclass(frozen=True)
class _DecodePlan:
    rows: list[int]  # the batch's decode sequences
    groups: list[tuple[int, int, list[int]]]  # (head start slot, head length, member rows)
    tail_idx: torch.Tensor  # [R, T] slots of each row's tail, zero-padded
    tail_mask: torch.Tensor  # [R, 1, 1, T] additive: 0 on real slots, -inf on padding


def _plan_decode(attn: AttentionMetadata, rows: list[int], dtype: torch.dtype, device: torch.device) -> _DecodePlan:
    by_start: dict[int, list[int]] = {}
    for i in rows:
        by_start.setdefault(attn.context_runs[i][0][0], []).append(i)
    groups, head_len = [], {}
    for start, members in by_start.items():
        # every member keeps at least its last token in the tail, so no tail is empty
        shared = min(min(attn.context_runs[i][0][1], attn.seq_lens[i] - 1) for i in members)
        groups.append((start, shared, members))
        head_len.update(dict.fromkeys(members, shared))
    tails = [slots_after(attn.context_runs[i], head_len[i]) for i in rows]
    longest = max(len(t) for t in tails)
    idx = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.full((len(rows), 1, 1, longest), float("-inf"), dtype=dtype)
    for j, t in enumerate(tails):
        idx[j, : len(t)] = torch.tensor(t, dtype=torch.long)
        mask[j, 0, 0, : len(t)] = 0.0
    return _DecodePlan(rows, groups, idx.to(device), mask.to(device))


def _decode_cascade(
    q: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionMetadata, rows: list[int], scale: float
) -> dict[int, torch.Tensor]:
    """Decode tokens (one query each) over paged contexts, reading the cache in place (CPU).

    Each context splits into a *head* — the start of its first run of consecutive slots, read in
    place — and a short *tail* (the rest: its own recent blocks). Sequences whose heads start at
    the same slot share a cached prefix: they attend to it in one call with their queries stacked,
    so its K/V are read once, not once per sequence. All tails are gathered into one padded batch
    and attended in one call; heads and tails merge exactly by log-sum-exp.
    """
    if attn.decode_plan is None or attn.decode_plan.rows != rows:
        attn.decode_plan = _plan_decode(attn, rows, q.dtype, q.device)
    plan = attn.decode_plan
    kvh, d = kv_cache.shape[1], kv_cache.shape[3]
    heads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for start, shared, members in plan.groups:
        qs = torch.stack([q[attn.query_start_loc[i]].view(kvh, -1, d) for i in members], dim=1)  # [kvh, m, G, d]
        o, l = _flash(qs.reshape(1, kvh, -1, d), kv_cache, (start, shared), scale)
        o, l = o.view(kvh, len(members), -1, d), l.view(kvh, len(members), -1)
        for j, i in enumerate(members):
            heads[i] = (o[:, j], l[:, j])  # [kvh, G, d], [kvh, G]
    num_rows, longest = plan.tail_idx.shape
    shape = (kvh, num_rows, longest, d)
    flat = plan.tail_idx.view(-1)
    k = kv_cache[0].index_select(1, flat).to(q.dtype).view(shape).transpose(0, 1)  # [R, kvh, T, d]
    v = kv_cache[1].index_select(1, flat).to(q.dtype).view(shape).transpose(0, 1)
    qr = torch.stack([q[attn.query_start_loc[i]].view(kvh, -1, d) for i in rows])  # [R, kvh, G, d]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    tail = flash(qr, k, v, attn_mask=plan.tail_mask, scale=scale)[:2]  # [R, kvh, G, d], [R, kvh, G]
    head = (torch.stack([heads[i][0] for i in rows]), torch.stack([heads[i][1] for i in rows]))
    out, _ = _merge(head, tail)
    return {i: out[j].reshape(1, -1, d) for j, i in enumerate(rows)}


def decode_rows(attn: AttentionMetadata) -> list[int]:
    """Sequences of this step that decode: one query over a context of more than one token."""
    return [
        i for i in range(attn.num_seqs)
        if attn.query_start_loc[i + 1] - attn.query_start_loc[i] == 1 < attn.seq_lens[i]
    ]


def slots_after(runs: list[Run], skip: int) -> list[int]:
    """Slots of the positions after the first ``skip`` ones of a context given as runs."""
    out: list[int] = []
    for start, length in runs:
        if skip >= length:
            skip -= length
            continue
        out.extend(range(start + skip, start + length))
        skip = 0
    return out


def runs_before(runs: list[Run], count: int) -> list[Run]:
    """The runs covering the first ``count`` slots of a context given as runs."""
    out: list[Run] = []
    for start, length in runs:
        if count <= 0:
            break
        out.append((start, min(length, count)))
        count -= length
    return out


def _prefill_in_place(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, kv_cache: torch.Tensor,
                      cached: list[Run], scale: float) -> torch.Tensor:
    """A prefill chunk over a cached context, with nothing gathered: each cached run is read in
    place by the flash kernel (the queries folded by KV head: no mask, every cached key precedes
    every query), the chunk attends causally over its own fresh K/V, and the parts are merged by
    their log-sum-exps. q: [n, H, d]; k_new, v_new: [n, kvh, d]; returns [n, H, d]."""
    n, num_heads, d = q.shape
    kvh = kv_cache.shape[1]
    g = num_heads // kvh
    folded = q.reshape(n, kvh, g, d).transpose(0, 1).reshape(1, kvh, n * g, d)
    acc: tuple[torch.Tensor, torch.Tensor] | None = None
    for run in cached:
        acc = _merge(acc, _flash(folded, kv_cache, run, scale))
    assert acc is not None
    out_c = acc[0].reshape(kvh, n, g, d).transpose(1, 2).reshape(1, num_heads, n, d)
    lse_c = acc[1].reshape(kvh, n, g).transpose(1, 2).reshape(1, num_heads, n)
    kf = _as_stored(k_new, kv_cache).transpose(0, 1).repeat_interleave(g, dim=0).unsqueeze(0)  # [1, H, n, d]
    vf = _as_stored(v_new, kv_cache).transpose(0, 1).repeat_interleave(g, dim=0).unsqueeze(0)
    qh = q.transpose(0, 1).unsqueeze(0).contiguous()
    fresh = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kf, vf, is_causal=True, scale=scale)[:2]
    out, _ = _merge((out_c, lse_c), (fresh[0], fresh[1]))
    return out[0].transpose(0, 1)


def _gather(kv_cache: torch.Tensor, runs: list[Run], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if len(runs) == 1:
        start, length = runs[0]
        k, v = kv_cache[0, :, start : start + length], kv_cache[1, :, start : start + length]
    else:
        idx = torch.cat([torch.arange(s, s + n, device=kv_cache.device) for s, n in runs])
        k, v = kv_cache[0].index_select(1, idx), kv_cache[1].index_select(1, idx)
    return k.to(dtype), v.to(dtype)  # [kvh, ctx, d] each (no copy when already in dtype)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    cpu_kernels: bool | None = None,
) -> torch.Tensor:
    """Store this step's K/V, then attend every query over its sequence's full context.

    q: [num_tokens, H, d]; k, v: [num_tokens, kvh, d]; returns [num_tokens, H, d].
    ``cpu_kernels`` (default: on CPU tensors) picks cascade decode with the CPU flash kernel; False
    runs the portable path GPUs take (tests force it on CPU so it never goes untested).
    """
    write_kv(kv_cache, k, v, attn.slot_mapping)
    decodes: dict[int, torch.Tensor] = {}
    in_place = q.device.type == "cpu" if cpu_kernels is None else cpu_kernels
    if in_place:
        rows = decode_rows(attn)
        decodes = _decode_cascade(q, kv_cache, attn, rows, scale) if rows else {}
    outs = []
    for i in range(attn.num_seqs):
        if i in decodes:
            outs.append(decodes[i])
            continue
        start, end = attn.query_start_loc[i], attn.query_start_loc[i + 1]
        if end - start == attn.seq_lens[i]:
            # nothing cached before this chunk: the fresh K/V are the whole context, skip the read
            k_ctx = _as_stored(k[start:end], kv_cache).transpose(0, 1)
            v_ctx = _as_stored(v[start:end], kv_cache).transpose(0, 1)
        elif in_place:
            cached = runs_before(attn.context_runs[i], attn.seq_lens[i] - (end - start))
            outs.append(_prefill_in_place(q[start:end], k[start:end], v[start:end], kv_cache, cached, scale))
            continue
        else:
            k_ctx, v_ctx = _gather(kv_cache, attn.context_runs[i], q.dtype)
        outs.append(_attend_contiguous(q[start:end], k_ctx, v_ctx, scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
