"""The step's attention plan (``model/cascade.py`` runs it): which sequences share a cached prefix
(*groups*), what each decode's tail and each prefill chunk's private keys are, as runs of the paged
cache read in place, or as slot indexes for kernels that read by slot. Built once per step, before
the first layer; every layer reuses it. Pure bookkeeping over block tables: no kernel, no K/V.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from promptcache.model.attention import AttentionMetadata, Run, runs_before

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
    tail_mask: torch.Tensor | None  # [R, 1, 1, L] additive: 0 on real slots, -inf on padding (not by_slot plans)
    tail_lens: torch.Tensor | None  # [R] int64 on the CPU: real slots of each tail (kernels that take lengths)
    whole_tail: bool = False  # some decodes are in no group: their whole context is in the tail
    perm_identity: bool = False  # the permuted batch is the batch (a step of one group, nothing cold)
    tail_span: tuple[int, int] | None = None  # the decodes' permuted rows, when they are one range
    tail_only: bool = False  # every permuted row is a whole-context decode in the tail call, in order
    by_slot: bool = False  # groups' and chunks' keys only as slot indexes (``idx``): for kernels that read by slot
    # by_slot plans: prefill chunks sharing their cached context with no other sequence of the step, as
    # (first batch row, end, [1, context] every slot of the context, its own fresh ones last): one causal
    # call over the cache, nothing merged (their rows are in no group, chunk or tail, and not in perm)
    whole: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)


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
                 by_slot: bool = False, whole_chunks: bool = False) -> CascadePlan:
    """The step's plan. ``by_slot``: each group's shared keys and each chunk's private keys also as
    one slot index (``idx``), for a kernel that reads the paged cache by slot: one call however
    fragmented the blocks, nothing to merge. ``short_context``: ``SHORT_CONTEXT`` by default, no
    limit for ``by_slot`` plans (their kernel reads tails by slot and length: no padding to pay).
    ``whole_chunks`` (``by_slot`` plans only): a prefill chunk alone on its cached context is one causal
    call over all its slots (``CascadePlan.whole``) — for a kernel that splits a causal call's keys
    when its few queries would leave threads idle."""
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
    group_runs: list[list[Run]] = []  # by_slot plans: each group's cached keys, then each chunk's
    chunk_runs: list[list[Run]] = []
    whole_rows: list[tuple[int, int]] = []  # by_slot plans: lone prefill chunks, attended whole
    whole_runs: list[list[Run]] = []
    whole_tail = False  # some decode has its whole context in the tail (no group part first)
    for members in by_first.values():
        if by_slot and whole_chunks and len(members) == 1 and qsl[members[0] + 1] - qsl[members[0]] > 1:
            i = members[0]  # a prefill chunk alone on its context: every slot, cached and fresh, in one call
            whole_rows.append((qsl[i], qsl[i + 1]))
            whole_runs.append(ctx_runs[i])
            continue
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
                chunk_runs.append(runs)
        if shared_len:
            runs = runs_before(ctx_runs[members[0]], shared_len)
            groups.append(Group(lo, len(perm), len(members), [] if by_slot else _keys(runs, min_run, device)))
            group_runs.append(runs)
        else:
            whole_tail = True
    whole: list[tuple[int, int, torch.Tensor]] = []
    if by_slot and (groups or chunks or whole_rows):  # every slot list expanded at once: a row of one index each
        idx, counts = _slot_rows(group_runs + chunk_runs + whole_runs)
        idx = idx.to(device)
        lengths = counts.tolist()
        rows = [idx[r, :c].view(1, -1) if c else None for r, c in enumerate(lengths)]
        groups = [replace(g, idx=rows[j]) for j, g in enumerate(groups)]
        chunks = [replace(c, idx=rows[len(groups) + j]) for j, c in enumerate(chunks)]
        base = len(groups) + len(chunks)  # a whole chunk's context holds at least its own tokens: never empty
        whole = [(lo, hi, idx[base + j, : lengths[base + j]].view(1, -1)) for j, (lo, hi) in enumerate(whole_rows)]
    tail_idx = tail_mask = tail_lens = None
    if tails:
        idx, tail_lens = _slot_rows(tails)
        tail_idx = idx.to(device)
        if not by_slot:  # kernels that take the tails gathered, padded and masked (by_slot ones take lengths)
            mask = torch.zeros(idx.shape, dtype=dtype).masked_fill_(torch.arange(idx.shape[1]) >= tail_lens[:, None],
                                                                     float("-inf"))
            tail_mask = mask.view(idx.shape[0], 1, 1, idx.shape[1]).to(device)
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
        whole=whole,
    )
