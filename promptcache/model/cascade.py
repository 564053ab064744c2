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
  K/V (read from the projections, not the cache);

all merged exactly, per query, by their log-sum-exps, in float32. Runs shorter than
``MIN_RUN_IN_PLACE`` slots are gathered together into one call instead of many tiny ones (a
fragmented block table must not cost a kernel call per block). Nothing is gathered whole.

The same plan runs on every device; only the kernel differs (``model/kernels.py``): our bf16 kernel
(``native_flash``: grouped heads, slots and lengths read in place), PyTorch's CPU flash kernel, or,
elsewhere, plain matmuls (``math_attention``) — all read the runs as strided views, in place. Tests
force each on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from promptcache.model import native
from promptcache.model.attention import (
    AttentionMetadata,
    Run,
    as_stored,
    attend_causal,
    runs_before,
    write_kv,
)
from promptcache.model.kernels import Kernel, cpu_flash, math_attention, native_flash

MIN_RUN_IN_PLACE = 128  # slots; shorter runs are gathered together (a copy is cheaper than a call)
# a decode sharing its context with no other sequence of the step, and whose context is this short,
# is attended whole in the step's one padded tail call instead of calls of its own. Measured per
# layer (bf16, 2 threads; own calls / all in the tail): 16 decodes of 128 tokens 2.0 / 1.0 ms, of
# 256 1.95 / 1.6, of 512 2.6 / 6.4 (the gather and the padding overtake the calls' overhead).
# Kernels that read tails by slot and length (``by_slot`` plans) pad nothing and gather nothing: there
# every tail goes to the one call, however long (32 lone decodes, float32 kernel, 2 threads, per
# layer: contexts of 300 tokens 5.5 -> 1.0 ms, of 1,024 7.7 -> 4.2 ms, of 4,096 20.9 -> 19.7 ms)
SHORT_CONTEXT = 256

@dataclass(frozen=True)
class Keys:
    """The keys of one call: a run of consecutive slots read in place, or short runs gathered."""

    run: Run | None = None
    slots: torch.Tensor | None = None  # [n] when gathered


@dataclass(frozen=True)
class Group:
    """Sequences sharing a cached prefix: their queries are rows [lo, hi) of the permuted batch."""

    lo: int
    hi: int
    num_seqs: int
    shared: list[Keys]
    idx: torch.Tensor | None = None  # [1, n] every shared slot, for kernels that read by slot (one call)


@dataclass(frozen=True)
class Chunk:
    """A prefill chunk over a cached context, or a decode whose own context past its group's shared
    part is too long for the padded tail call (``fresh`` False: its token is in ``private``)."""

    lo: int  # its queries' rows in the permuted batch
    hi: int
    start: int  # ... and in the step's batch (where its fresh K/V are)
    end: int
    private: list[Keys]  # cached keys past its group's shared part
    fresh: bool = True  # attend causally over its own fresh K/V
    idx: torch.Tensor | None = None  # [1, n] the private slots, for kernels that read by slot


@dataclass(frozen=True)
class CascadePlan:
    cold: list[tuple[int, int]]  # batch rows of chunks with nothing cached: plain causal attention
    perm: torch.Tensor | None  # [M] the batch row of each permuted row (queries over a cached context)
    groups: list[Group]
    chunks: list[Chunk]
    tail_rows: torch.Tensor | None  # [R] permuted rows of the step's decodes
    tail_idx: torch.Tensor | None  # [R, L] slots of each decode's tail, zero-padded
    tail_mask: torch.Tensor | None  # [R, 1, 1, L] additive: 0 on real slots, -inf on padding
    tail_lens: torch.Tensor | None  # [R] int64 on the CPU: real slots of each tail (kernels that take lengths)
    whole_tail: bool = False  # some decodes are in no group: their whole context is in the tail
    perm_identity: bool = False  # the permuted batch is the batch (a step of one group, nothing cold)
    tail_span: tuple[int, int] | None = None  # the decodes' permuted rows, when they are one range
    tail_only: bool = False  # every permuted row is a whole-context decode in the tail call, in order
    by_slot: bool = False  # groups' and chunks' keys only as slot indexes (``idx``): for kernels that read by slot


def _keys(runs: list[Run], min_run: int, device: torch.device) -> list[Keys]:
    keys = [Keys(run=r) for r in runs if r[1] >= min_run]
    short = [s for start, n in runs if n < min_run for s in range(start, start + n)]
    if short:
        keys.append(Keys(slots=torch.tensor(short, dtype=torch.long, device=device)))
    return keys


def _common_prefix(a: list[Run], b: list[Run], hi: int) -> int:
    """How many of the first ``hi`` runs of a and b are equal (slices compared in C, by bisection)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_runs(run_lists: list[list[Run]]) -> list[Run]:
    """The runs every context starts with (the last one cut where they part)."""
    first = run_lists[0]
    k = min(len(r) for r in run_lists)
    for other in run_lists[1:]:
        k = _common_prefix(first, other, k)
    out = first[:k]
    if all(len(r) > k for r in run_lists) and len({r[k][0] for r in run_lists}) == 1:
        out.append((first[k][0], min(r[k][1] for r in run_lists)))  # same start, parting lengths
    return out


def _runs_between(runs: list[Run], lo: int, hi: int) -> list[Run]:
    """The runs covering positions [lo, hi) of a context given as runs."""
    whole_rest = hi >= sum(n for _, n in runs)  # the range runs to the context's end
    out: list[Run] = []
    pos = 0
    for j, (start, length) in enumerate(runs):
        if pos >= hi:
            break
        if pos >= lo and whole_rest:
            return out + runs[j:]  # the rest of the runs as they are
        a, b = max(lo, pos), min(hi, pos + length)
        if a < b:
            out.append((start + a - pos, b - a))
        pos += length
    return out


def _slot_rows(run_lists: list[list[Run]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots of each context given as runs, as rows of one index ``[R, longest]`` (zero-padded)
    and their lengths ``[R]`` — expanded by tensor ops, not slot by slot in Python (a step of 32
    decodes over 4,096-token contexts holds 131,072 slots)."""
    runs = torch.tensor([r for rl in run_lists for r in rl], dtype=torch.long).view(-1, 2)
    starts, counts = runs[:, 0], runs[:, 1]
    row_of_run = torch.arange(len(run_lists)).repeat_interleave(torch.tensor([len(rl) for rl in run_lists]))
    lens = torch.zeros(len(run_lists), dtype=torch.long).index_add_(0, row_of_run, counts)
    flat = torch.arange(int(counts.sum()))
    slots = (starts - (counts.cumsum(0) - counts)).repeat_interleave(counts) + flat  # each run's slots
    rows = row_of_run.repeat_interleave(counts)
    idx = torch.zeros(len(run_lists), int(lens.max()), dtype=torch.long)
    idx[rows, flat - (lens.cumsum(0) - lens)[rows]] = slots
    return idx, lens


def plan_cascade(attn: AttentionMetadata, dtype: torch.dtype, device: torch.device,
                 min_run: int = MIN_RUN_IN_PLACE, short_context: int | None = None,
                 by_slot: bool = False) -> CascadePlan:
    """The step's plan. ``by_slot``: each group's shared keys and each chunk's private keys also as
    one slot index (``idx``), for a kernel that reads the paged cache by slot: one call however
    fragmented the blocks, nothing to merge. ``short_context``: ``SHORT_CONTEXT`` by default, no
    limit for ``by_slot`` plans (their kernel reads tails by slot and length: no padding to pay)."""
    if short_context is None:
        short_context = 1 << 62 if by_slot else SHORT_CONTEXT
    qsl, lens, ctx_runs = attn.query_start_loc, attn.seq_lens, attn.context_runs
    cold: list[tuple[int, int]] = []
    by_first: dict[int, list[int]] = {}
    for i in range(attn.num_seqs):
        if qsl[i + 1] - qsl[i] == lens[i]:
            cold.append((qsl[i], qsl[i + 1]))
        else:
            by_first.setdefault(ctx_runs[i][0][0], []).append(i)
    perm: list[int] = []
    groups: list[Group] = []
    chunks: list[Chunk] = []
    tail_rows: list[int] = []
    tails: list[list[Run]] = []
    by_slot_runs: list[list[Run]] = []  # the cached keys of each group, then of each chunk (by_slot plans)
    whole_tail = False  # some decode has its whole context in the tail (no group part first)
    for members in by_first.values():
        members.sort(key=lambda i: qsl[i + 1] - qsl[i] > 1)  # decodes first (stable)
        # what every member has cached (a decode's own token stays in its tail)
        cached = min(lens[i] - (qsl[i + 1] - qsl[i]) for i in members)
        if len(members) == 1 and lens[members[0]] <= short_context and qsl[members[0] + 1] - qsl[members[0]] == 1:
            shared_len = 0  # a short lone decode: all of it in the tail call
        elif len(members) == 1:
            shared_len = cached  # its whole cached context (its runs cover exactly its length)
        else:
            shared_len = min(sum(n for _, n in _common_runs([ctx_runs[i] for i in members])), cached)
        lo = len(perm)
        for i in members:
            row, n = len(perm), qsl[i + 1] - qsl[i]
            perm.extend(range(qsl[i], qsl[i + 1]))
            if n == 1 and lens[i] - shared_len <= short_context:
                tail_rows.append(row)
                tails.append(_runs_between(ctx_runs[i], shared_len, lens[i]))
            else:  # n == 1: a long context of its own, read in place, not padded into everyone's tail
                runs = _runs_between(ctx_runs[i], shared_len, lens[i] - (n if n > 1 else 0))
                chunks.append(Chunk(row, row + n, qsl[i], qsl[i + 1], [] if by_slot else _keys(runs, min_run, device),
                                    fresh=n > 1))
                by_slot_runs.append(runs)
        if shared_len:
            runs = runs_before(ctx_runs[members[0]], shared_len)
            groups.append(Group(lo, len(perm), len(members), [] if by_slot else _keys(runs, min_run, device)))
            by_slot_runs.insert(len(groups) - 1, runs)
        else:
            whole_tail = True
    if by_slot and by_slot_runs:  # every group's and chunk's slots, expanded at once: a row of one index each
        idx, counts = _slot_rows(by_slot_runs)
        idx = idx.to(device)
        rows = [idx[r, :c].view(1, -1) if c else None for r, c in enumerate(counts.tolist())]
        groups = [replace(g, idx=rows[j]) for j, g in enumerate(groups)]
        chunks = [replace(c, idx=rows[len(groups) + j]) for j, c in enumerate(chunks)]
    tail_idx = tail_mask = tail_lens = None
    if tails:
        idx, tail_lens = _slot_rows(tails)
        mask = torch.zeros(idx.shape, dtype=dtype).masked_fill_(torch.arange(idx.shape[1]) >= tail_lens[:, None],
                                                                 float("-inf"))
        tail_idx, tail_mask = idx.to(device), mask.view(idx.shape[0], 1, 1, idx.shape[1]).to(device)
    return CascadePlan(
        cold=cold,
        perm=torch.tensor(perm, dtype=torch.long, device=device) if perm else None,
        groups=groups,
        chunks=chunks,
        tail_rows=torch.tensor(tail_rows, dtype=torch.long, device=device) if tail_rows else None,
        tail_idx=tail_idx,
        tail_mask=tail_mask,
        tail_lens=tail_lens,
        whole_tail=whole_tail,
        perm_identity=perm == list(range(qsl[-1])),
        tail_span=(tail_rows[0], tail_rows[-1] + 1)
        if tail_rows and tail_rows == list(range(tail_rows[0], tail_rows[-1] + 1)) else None,
        tail_only=not groups and not chunks and bool(tail_rows) and tail_rows == list(range(len(perm))),
        by_slot=by_slot,
    )


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


def _write(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, grouped: bool) -> None:
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
    _write(kv_cache, k, v, attn.slot_mapping, grouped)
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
