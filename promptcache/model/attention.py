"""Paged attention: K/V live in preallocated per-layer slot tensors; sequences address them by slot.

The model never sees a request or a block object. The engine hands it an ``AttentionMetadata``
(plain tensors and ints) as an argument of ``forward``; there is no module-level context.

Storage layout, per layer: ``kv_cache[2, num_kv_heads, num_slots, head_dim]`` (head-major), where
slot ``block_id * block_size + offset`` holds the token at ``offset`` in block ``block_id``.
Head-major means a run of consecutive slots is a strided *view* ``[kv_heads, run, head_dim]`` that
attention reads in place; how a step's contexts are read (shared prefixes once, nothing gathered
whole) is ``model/cascade.py``'s plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

Run = tuple[int, int]  # (first slot, number of slots): consecutive slots in token order


class Backend(Protocol):
    """What the model calls of the runner's attention backend (``model/backends.py``)."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 attn: AttentionMetadata, scale: float) -> torch.Tensor:
        """Store the step's K/V (at ``attn.slot_mapping``), then attend every query over its context."""
        ...

    def write(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store K/V rows at ``slots`` only (``write_kv``'s meaning, the backend's fastest way)."""
        ...


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
    num_kv_heads: int = 0  # of the KV storage (plans need it before any layer runs)
    # the backend the runner picked (model/backends.py); the model refuses to run without one
    backend: Backend | None = field(default=None, repr=False)
    # per-step plans a backend builds once, before the first layer, and every layer reuses
    cascade_plan: object | None = field(default=None, repr=False)  # model/cascade.py's
    deterministic_plan: object | None = field(default=None, repr=False)  # model/deterministic.py's
    # the rows whose final hidden states are wanted, where that is not every row (``output_rows``)
    outputs: OutputRows | None = field(default=None, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


@dataclass
class OutputRows:
    """The rows of a step whose final hidden states anyone reads: each sampling sequence's last
    token. The last layer stores every row's K/V but runs its output projection and MLP — and, where
    ``attn`` is given, its attention — for these rows only: nothing reads the other rows' results (a
    next layer would; there is none). A prefill chunk that samples nothing skips all of the last layer
    but its q|k|v projection; a warm request's chunk computes one row of the rest (``model/transformer.py``)."""

    rows: torch.Tensor  # [R] int64, ascending: rows of the step's batch
    # those rows as one-token queries over their whole contexts (decodes' shape), planned by the
    # backend beside the step's plan; None: the last layer attends every row by the step's plan and
    # keeps these rows after (a step with decodes: planning them twice would cost more than it saves)
    attn: AttentionMetadata | None


def output_rows(attn: AttentionMetadata, seq_indices: list[int]) -> OutputRows | None:
    """``OutputRows`` of the last tokens of sequences ``seq_indices`` (ascending) of a step, or None
    when those are all of its rows (a step of decodes only). Only a step without decodes gets the
    rows' own attention metadata (its plans are the backend's to build, like the step's): the kept
    rows are then its sampling chunks' last tokens, a few rows to plan against the many the pruning
    saves, while a step with decodes would plan every decode's context a second time (32 decodes over
    4,096 tokens beside a 128-token chunk: +7.4 ms per step with our kernels, +117 ms deterministic)."""
    qsl = attn.query_start_loc
    if len(seq_indices) == qsl[-1]:
        return None
    device = attn.slot_mapping.device
    rows = torch.tensor([qsl[i + 1] - 1 for i in seq_indices], dtype=torch.long).to(device)
    if seq_indices and any(qsl[i + 1] - qsl[i] == 1 for i in range(attn.num_seqs)):  # a decode (or a 1-token chunk)
        return OutputRows(rows, None)
    last = AttentionMetadata(
        slot_mapping=attn.slot_mapping.index_select(0, rows),
        query_start_loc=list(range(len(seq_indices) + 1)),
        seq_lens=[attn.seq_lens[i] for i in seq_indices],
        context_runs=[attn.context_runs[i] for i in seq_indices],
        num_kv_heads=attn.num_kv_heads,
        backend=attn.backend,
    )
    return OutputRows(rows, last)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    # kv_cache: [2, kvh, num_slots, d]; k, v: [num_tokens, kvh, d] (cast to the cache's dtype)
    kv_cache[0].index_copy_(1, slots, k.transpose(0, 1).to(kv_cache.dtype))
    kv_cache[1].index_copy_(1, slots, v.transpose(0, 1).to(kv_cache.dtype))


def as_stored(t: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
    """Fresh K/V rounded the way the cache stores them, so a request attends to the same values
    whether its context was computed now or read from the cache (cached == uncached, exactly)."""
    return t if t.dtype == kv_cache.dtype else t.to(kv_cache.dtype).to(t.dtype)


def attend_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """A chunk with nothing cached before it over its own K/V. q: [n, H, d]; k, v: [kvh, n, d]."""
    # 4-D [1, heads, len, d]: SDPA's fused CPU kernel only takes batched input (3-D falls back to math)
    qh, kh, vh = q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=qh.shape[1] != kh.shape[1])
    return out[0].transpose(0, 1)


def runs_of_blocks(block_ids: list[int], num_tokens: int, block_size: int) -> list[Run]:
    """Slots of positions [0, num_tokens) of a block table, as runs of consecutive slots (consecutive
    block ids merge into one run)."""
    runs: list[Run] = []
    for b in block_ids[: -(-num_tokens // block_size)]:
        if runs and runs[-1][0] + runs[-1][1] == b * block_size:
            runs[-1] = (runs[-1][0], runs[-1][1] + block_size)
        else:
            runs.append((b * block_size, block_size))
    unfilled = -num_tokens % block_size  # slots of the last block past the last token
    if unfilled:
        runs[-1] = (runs[-1][0], runs[-1][1] - unfilled)
    return runs


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
