"""Attention over paged contexts read where they lie: one plan per step, a few calls per layer.

Sequences of a step whose contexts start at the same slot share a cached prefix (a block is shared
only by requests with the same content before it). Each such *group* attends to the part its
members have in common — every run of it, not only the first — in one call per run with all its
members' queries stacked (cascade attention: the shared K/V are read once per layer, not once per
sequence; no mask: every shared key precedes every query). What is left of each context:

- a decode token's *tail* (its own recent blocks and itself): every decode of the step in one
  padded call (a decode that shares nothing with the step's other sequences and has a short
  context, ``SHORT_CONTEXT``, is attended whole there: no calls of its own; a tail longer than that
  is read in place instead, so one long private history does not pad every decode's tail — except
  for kernels that read tails by slot and length, ``by_slot`` plans: they pad nothing, so every
  tail, however long, goes to the one call);
- a prefill chunk's cached keys past the shared part, then its causal attention over its own fresh
  K/V (read from the projections, not the cache) — except in ``by_slot`` plans for the float32
  kernel (``whole_chunks``), where a chunk whose context no other sequence of the step shares (a warm
  request, a long prompt's later chunks) is one causal call over every slot of its context, the fresh
  ones (stored first) last: nothing to merge;

all merged exactly, per query, by their log-sum-exps, in float32. Runs shorter than
``MIN_RUN_IN_PLACE`` slots are gathered together into one call instead of many tiny ones (a
fragmented block table must not cost a kernel call per block). Nothing is gathered whole. The plan
(``model/cascade_plan.py``) is built once per step; this module runs it in every layer.

The same plan runs on every device; only the kernel differs (``model/kernels.py``): our bf16 kernel
(``native_flash``: grouped heads, slots and lengths read in place), PyTorch's CPU flash kernel, or,
elsewhere, plain matmuls (``math_attention``) — all read the runs as strided views, in place. Tests
force each on CPU.
"""

from __future__ import annotations

import torch

from promptcache.model import native
from promptcache.model.attention import AttentionMetadata, as_stored, attend_causal, write_kv
from promptcache.model.cascade_plan import CascadePlan, Keys, plan_cascade
from promptcache.model.kernels import Kernel, cpu_flash, math_attention, native_flash


def _read(kv_cache: torch.Tensor, keys: Keys, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V of one call as [1, kvh, n, d] (a view of the cache for a run; a copy if gathered or cast)."""
    if keys.run is not None:
        start, n = keys.run
        k, v = kv_cache[0, :, start : start + n], kv_cache[1, :, start : start + n]
    else:
        assert keys.slots is not None
        k, v = kv_cache[0].index_select(1, keys.slots), kv_cache[1].index_select(1, keys.slots)
    return k.to(dtype).unsqueeze(0), v.to(dtype).unsqueeze(0)


def _read_tails(kv_cache: torch.Tensor, plan: CascadePlan, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The decodes' tails as K, V ``[R, kvh, L, d]``: one gather of both (zero-padded; masked)."""
    assert plan.tail_idx is not None
    (r, length), (_, kvh, _, d) = plan.tail_idx.shape, kv_cache.shape
    kv = kv_cache.flatten(0, 1).index_select(1, plan.tail_idx.view(-1)).to(dtype)  # [2 * kvh, R * L, d]
    kv = kv.view(2, kvh, r, length, d).transpose(1, 2)
    return kv[0], kv[1]


def _tail_call(kernel: Kernel, grouped: bool, q: torch.Tensor, kv_cache: torch.Tensor, scale: float,
               plan: CascadePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The decodes' one call: a grouped (native) kernel reads each tail's slots in place, by length;
    other kernels get the tails gathered, zero-padded and masked."""
    if grouped:
        return native_flash(q, kv_cache[0], kv_cache[1], scale, kv_lens=plan.tail_lens, kv_idx=plan.tail_idx)
    kt, vt = _read_tails(kv_cache, plan, q.dtype)
    return kernel(q, kt, vt, scale, plan.tail_mask, False)


def write(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, grouped: bool) -> None:
    """K/V rows to their slots: our library's copy for the native (``grouped``) kernels, else ``write_kv``."""
    lib = native.library_for(k.dtype) if grouped and k.dtype == kv_cache.dtype else None
    if lib is not None:
        lib.write_kv(kv_cache, k, v, slots)  # rows copied to their slots (index_copy_ is ~10x slower here)
    else:
        write_kv(kv_cache, k, v, slots)


def _merge_into(acc_o: torch.Tensor, acc_l: torch.Tensor, o: torch.Tensor, lse: torch.Tensor) -> None:
    """Fold a part (o, lse) over other keys into the float32 accumulators, in place (exact)."""
    total = torch.logaddexp(acc_l, lse)
    acc_o.mul_(torch.exp(acc_l - total).unsqueeze(-1)).add_(o.float() * torch.exp(lse - total).unsqueeze(-1))
    acc_l.copy_(total)


def cascade_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                      attn: AttentionMetadata, scale: float, kernel: Kernel, grouped: bool = False) -> torch.Tensor:
    """Store this step's K/V, then attend every query over its context by the step's plan.

    q: [T, H, d]; k, v: [T, kvh, d]; returns [T, H, d] in q's dtype. ``grouped``: the kernel takes
    K/V with fewer heads than q, so causal parts (cold chunks, fresh K/V) go to it as they are, and
    the decode tails' lengths (``kv_lens=``) instead of their padding mask (``native_flash``);
    otherwise cold chunks go to SDPA and fresh K/V are repeated per query head.
    """
    write(kv_cache, k, v, attn.slot_mapping, grouped)
    plan = attn.cascade_plan
    if not isinstance(plan, CascadePlan):
        plan = attn.cascade_plan = plan_cascade(attn, q.dtype, q.device)
    assert grouped or not plan.by_slot, "a by_slot plan holds its cached keys as slot indexes: native_flash's"
    out = torch.empty_like(q)
    for lo, hi in plan.cold:  # nothing cached: the fresh K/V are the whole context
        kc, vc = as_stored(k[lo:hi], kv_cache).transpose(0, 1), as_stored(v[lo:hi], kv_cache).transpose(0, 1)
        if grouped:
            o, _ = kernel(q[lo:hi].transpose(0, 1).unsqueeze(0), kc.unsqueeze(0), vc.unsqueeze(0), scale, None, True)
            out[lo:hi] = o[0].transpose(0, 1)
        else:
            out[lo:hi] = attend_causal(q[lo:hi], kc, vc, scale)
    for lo, hi, idx in plan.whole:  # by slot, its fresh K/V (stored above) the last keys: causal, nothing to merge
        o, _ = native_flash(q[lo:hi].transpose(0, 1).unsqueeze(0), kv_cache[0], kv_cache[1], scale, causal=True,
                            kv_idx=idx)
        out[lo:hi] = o[0].transpose(0, 1)
    if plan.perm is None:
        return out
    num_heads, d = q.shape[1:]
    kvh = kv_cache.shape[1]
    g = num_heads // kvh
    m_all = plan.perm.numel()
    # queries over a cached context, folded by KV head: [kvh, M, G, d]; accumulators alike, float32
    qp = q if plan.perm_identity else q.index_select(0, plan.perm)
    if plan.tail_only:  # lone short decodes, nothing else: the tail call's output is the answer
        o, _ = _tail_call(kernel, grouped, qp.view(m_all, kvh, g, d), kv_cache, scale, plan)  # [R, kvh, G, d]
        result = o.reshape(m_all, num_heads, d)
        if plan.perm_identity:
            return result
        out.index_copy_(0, plan.perm, result)
        return out
    qf = qp.reshape(m_all, kvh, g, d).transpose(0, 1).contiguous()
    if plan.whole_tail:  # rows no group initialises: start from nothing (0, -inf) for the tail merge
        acc_o = q.new_zeros(kvh, m_all, g, d, dtype=torch.float32)
        acc_l = q.new_full((kvh, m_all, g), float("-inf"), dtype=torch.float32)
    else:
        acc_o = q.new_empty(kvh, m_all, g, d, dtype=torch.float32)
        acc_l = q.new_empty(kvh, m_all, g, dtype=torch.float32)
    for grp in plan.groups:
        m = grp.hi - grp.lo
        qg = qf[:, grp.lo : grp.hi].reshape(1, kvh, m * g, d)
        parts = [None] if grouped and grp.idx is not None else grp.shared  # by slot: one call
        for j, keys in enumerate(parts):
            if keys is None:
                o, lse = native_flash(qg, kv_cache[0], kv_cache[1], scale, kv_idx=grp.idx)
            else:
                o, lse = kernel(qg, *_read(kv_cache, keys, q.dtype), scale, None, False)
            o, lse = o.view(kvh, m, g, d), lse.view(kvh, m, g)
            if j == 0 and not plan.whole_tail:  # a row is in one group at most: its first part initialises it
                acc_o[:, grp.lo : grp.hi].copy_(o)
                acc_l[:, grp.lo : grp.hi].copy_(lse)
            else:
                _merge_into(acc_o[:, grp.lo : grp.hi], acc_l[:, grp.lo : grp.hi], o, lse)
    for c in plan.chunks:
        n = c.hi - c.lo
        ao, al = acc_o[:, c.lo : c.hi], acc_l[:, c.lo : c.hi]
        qc = qf[:, c.lo : c.hi].reshape(1, kvh, n * g, d)
        if grouped and c.idx is not None:
            o, lse = native_flash(qc, kv_cache[0], kv_cache[1], scale, kv_idx=c.idx)
            _merge_into(ao, al, o.view(kvh, n, g, d), lse.view(kvh, n, g))
        else:
            for keys in c.private:
                o, lse = kernel(qc, *_read(kv_cache, keys, q.dtype), scale, None, False)
                _merge_into(ao, al, o.view(kvh, n, g, d), lse.view(kvh, n, g))
        if not c.fresh:
            continue
        # causal over its own fresh K/V, heads unfolded ([1, H, n, d]; K/V repeated per query head
        # unless the kernel reads grouped heads)
        kf = as_stored(k[c.start : c.end], kv_cache).transpose(0, 1).unsqueeze(0)
        vf = as_stored(v[c.start : c.end], kv_cache).transpose(0, 1).unsqueeze(0)
        if not grouped:
            kf, vf = kf.repeat_interleave(g, dim=1), vf.repeat_interleave(g, dim=1)
        qh = q[c.start : c.end].transpose(0, 1).unsqueeze(0).contiguous()
        o, lse = kernel(qh, kf, vf, scale, None, True)
        _merge_into(ao, al, o.view(kvh, g, n, d).transpose(1, 2), lse.view(kvh, g, n).transpose(1, 2))
    if plan.tail_rows is not None:
        rows = plan.tail_rows
        # one range of rows: views, merged in place; scattered rows: copies, merged, then put back
        sel = slice(*plan.tail_span) if plan.tail_span is not None else rows
        o, lse = _tail_call(kernel, grouped, qf[:, sel].transpose(0, 1), kv_cache, scale, plan)  # [R, kvh, G, d]
        ao, al = acc_o[:, sel], acc_l[:, sel]
        _merge_into(ao, al, o.transpose(0, 1), lse.transpose(0, 1))
        if plan.tail_span is None:
            acc_o[:, rows], acc_l[:, rows] = ao, al
    result = acc_o.transpose(0, 1).reshape(m_all, num_heads, d).to(q.dtype)
    if plan.perm_identity:  # every token is a permuted row, in order: nothing cold, nothing to scatter
        return result
    out.index_copy_(0, plan.perm, result)
    return out


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    attn: AttentionMetadata, scale: float, cpu_kernels: bool | None = None,
                    cpu_kernel: str = "torch") -> torch.Tensor:
    """``cascade_attention`` with the kernel for q's device: a CPU kernel on CPU tensors (PyTorch's
    flash kernel, or ``cpu_kernel="native"``: ``native_flash``), plain matmuls elsewhere.
    ``cpu_kernels=False`` forces the portable kernel (tests, on CPU)."""
    use_cpu = q.device.type == "cpu" if cpu_kernels is None else cpu_kernels
    if not use_cpu:
        return cascade_attention(q, k, v, kv_cache, attn, scale, math_attention)
    if cpu_kernel == "native":
        return cascade_attention(q, k, v, kv_cache, attn, scale, native_flash, grouped=True)
    return cascade_attention(q, k, v, kv_cache, attn, scale, cpu_flash)
