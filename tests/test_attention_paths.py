"""Every attention path in every dtype pair the engine can pick, against float64 attention.

Paths: a fresh prefill, a prefill chunk over a fragmented cached context, one decode, a batch of
decodes with their own contexts, and cascade decode (several decodes sharing a cached head). The
output must be in the query's dtype (a float32 merge leaking out of a 16-bit decode crashed the
next matmul on native-bf16 CPUs) and close to the exact result.
"""

from __future__ import annotations

import re

import pytest
import torch

from promptcache.model import native
from promptcache.model.attention import AttentionMetadata, runs_of_blocks
from promptcache.model.backends import CascadeNative
from promptcache.model.cascade import paged_attention
from promptcache.model.cascade_plan import plan_cascade
from promptcache.model.deterministic import deterministic_attention

BLOCK = 4
KVH, GROUP, D = 2, 2, 16  # 2 kv heads, 2 query heads each

# (block table, start_pos, new tokens): the context is [0, start_pos + new) in the table's slots
PATHS = {
    "prefill": [([0, 1, 2, 3, 4], 0, 19)],
    "chunked-prefill": [([7, 2, 3, 9, 10, 11], 13, 9)],
    "decode": [([5, 1, 8, 3], 14, 1)],
    "batched-decode": [([0, 1, 2], 9, 1), ([4, 5, 9, 10], 13, 1), ([12], 2, 1)],
    "cascade-decode": [([0, 1, 2, 3, 8], 17, 1), ([0, 1, 2, 3, 9, 10], 21, 1), ([0, 1, 2, 11], 13, 1)],
    "mixed": [([0, 1, 2, 3, 8], 17, 1), ([0, 1, 2, 12, 13], 12, 6), ([14, 15], 0, 7)],
    # chunks and a decode over one shared prefix (blocks 0-2); the first chunk has cached keys of
    # its own past it (block 4's first half), the decode a tail (blocks 3 and 11)
    "shared-chunks": [([0, 1, 2, 4, 8], 14, 4), ([0, 1, 2, 9, 10], 12, 7), ([0, 1, 2, 3, 11], 17, 1)],
    # decodes in two groups, one after a chunk: their rows of the permuted batch are not one range
    "scattered-tails": [([0, 1, 2, 4, 8], 14, 4), ([0, 1, 2, 3, 11], 17, 1), ([5, 6, 12], 9, 1)],
    # lone decodes around a cold chunk: with short_context 256 every cached query is in the tail call
    # (its output taken as is), and those rows are not the whole batch
    "decodes-and-cold": [([0, 1, 2], 9, 1), ([13, 14], 0, 6), ([4, 5], 6, 1)],
    # two groups (blocks 0-3 and block 5) and a cold chunk in one step
    "two-groups": [([0, 1, 2, 3, 8], 17, 1), ([0, 1, 2, 3, 9], 18, 1), ([5, 7, 15], 4, 5), ([5, 6, 12], 9, 1),
                   ([13, 14], 0, 6)],
    # two chunks each alone on its cached context (one over blocks out of order) beside a lone decode
    # and a cold chunk: by_slot plans attend each such chunk whole, in one causal call by slot
    "lone-chunks": [([0, 1, 2], 9, 1), ([4, 5, 6, 7], 10, 5), ([13, 14], 0, 6), ([8, 11, 10], 6, 3)],
}
# (min_run, short_context): runs of at least min_run slots are read in place, shorter ones gathered
# (1 = every run in place, a huge value = every cached key gathered; blocks here are 4 slots, runs
# up to 16); a decode alone in its group with a context of at most short_context tokens is attended
# whole in the tail call (0 = never, 256 = every lone decode here)
PLANS = {"in-place": (1, 0), "gathered": (10**6, 0), "mixed-runs": (8, 256)}
# (query dtype = compute dtype, KV cache dtype); the last is a float32-compute CPU with a bf16 cache
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
          (torch.float32, torch.bfloat16)]
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _runs(block_ids: list[int], num_tokens: int) -> list[tuple[int, int]]:
    return runs_of_blocks(block_ids, num_tokens, BLOCK)


def _slots(runs):
    return [s for start, n in runs for s in range(start, start + n)]


def _setup(path: str, q_dtype: torch.dtype, kv_dtype: torch.dtype, seed: int = 0, d: int = D):
    g = torch.Generator().manual_seed(seed)
    seqs = PATHS[path]
    kv_cache = torch.randn(2, KVH, 16 * BLOCK, d, generator=g).to(kv_dtype)
    starts, seq_lens, context_runs, new_slots = [0], [], [], []
    for table, start, n in seqs:
        runs = _runs(table, start + n)
        context_runs.append(runs)
        new_slots += _slots(runs)[start:]
        seq_lens.append(start + n)
        starts.append(starts[-1] + n)
    # slots no context covers hold NaN: no path may read them, not even as masked padding
    used = torch.zeros(kv_cache.shape[2], dtype=torch.bool)
    for runs in context_runs:
        used[_slots(runs)] = True
    kv_cache[:, :, ~used] = float("nan")
    T = starts[-1]
    q = torch.randn(T, KVH * GROUP, d, generator=g).to(q_dtype)
    k = torch.randn(T, KVH, d, generator=g).to(q_dtype)
    v = torch.randn(T, KVH, d, generator=g).to(q_dtype)
    attn = AttentionMetadata(torch.tensor(new_slots), starts, seq_lens, context_runs)
    return q, k, v, kv_cache, attn


def _reference(q, kv_cache, attn, scale) -> torch.Tensor:
    """Exact attention in float64 over what the cache holds after this step's write."""
    out = []
    for i in range(attn.num_seqs):
        idx = torch.tensor(_slots(attn.context_runs[i]))
        k = kv_cache[0][:, idx].double()  # [kvh, ctx, d]
        v = kv_cache[1][:, idx].double()
        qs = q[attn.query_start_loc[i] : attn.query_start_loc[i + 1]].double()  # [n, H, d]
        n, ctx = qs.shape[0], attn.seq_lens[i]
        k = k.repeat_interleave(GROUP, dim=0)  # [H, ctx, d]
        v = v.repeat_interleave(GROUP, dim=0)
        scores = torch.einsum("nhd,hcd->hnc", qs, k) * scale
        pos = torch.arange(ctx - n, ctx).unsqueeze(1)
        scores = scores.masked_fill(torch.arange(ctx).unsqueeze(0) > pos, float("-inf"))
        out.append(torch.einsum("hnc,hcd->nhd", scores.softmax(-1), v))
    return torch.cat(out)


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["cpu-kernels", "portable"])
@pytest.mark.parametrize("kernel", ["paged-in-place", "paged-gathered", "paged-mixed-runs", "deterministic"])
@pytest.mark.parametrize("q_dtype,kv_dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("path", list(PATHS))
def test_attention_path_matches_float64(path, q_dtype, kv_dtype, kernel, cpu_kernels):
    """``portable`` is the kernel GPUs run (plain matmuls, not the CPU flash kernel), forced here on CPU."""
    q, k, v, kv_cache, attn = _setup(path, q_dtype, kv_dtype)
    scale = D**-0.5
    if kernel.startswith("paged"):
        min_run, short = PLANS[kernel.removeprefix("paged-")]
        attn.cascade_plan = plan_cascade(attn, q_dtype, q.device, min_run=min_run, short_context=short)
        out = paged_attention(q, k, v, kv_cache, attn, scale, cpu_kernels=cpu_kernels)
    else:  # 8-key pieces: contexts here span up to three, so the merge runs
        out = deterministic_attention(q, k, v, kv_cache, attn, scale, piece_tokens=8, cpu_kernels=cpu_kernels)
    assert out.dtype == q_dtype and out.shape == q.shape
    ref = _reference(q, kv_cache, attn, scale)
    tol = max(TOL[q_dtype], TOL[kv_dtype])
    err = (out.double() - ref).abs().max().item()
    assert err < tol, f"{path} {q_dtype}/{kv_dtype}: max error {err:.2e}"


@pytest.mark.skipif(not (native.can_run() or native.can_run(spec=native.F32)),
                    reason="the native kernels need AVX512-BF16 (bf16) or AVX2 (float32)")
@pytest.mark.parametrize("by_slot", [True, False], ids=["by-slot", "by-run"])
@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("q_dtype,kv_dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("path", list(PATHS))
def test_native_kernel_path_matches_float64(path, q_dtype, kv_dtype, plan, by_slot):
    """The ``cpu-native`` backend's kernels (model/native.py) over every path: head size 32 (both
    take it); bf16 calls run in the bf16 kernel where the CPU has AVX512-BF16, float32 queries (over
    a float32 or a bf16 cache) in the float32 kernel where it has AVX2 (grouped K/V, causal parts,
    tails by slot and length; a group's or chunk's cached keys in one call by slot, or run by run);
    the rest falls back to PyTorch's kernel the same way."""
    d = 32
    q, k, v, kv_cache, attn = _setup(path, q_dtype, kv_dtype, d=d)
    min_run, short = PLANS[plan]
    # whole chunks as the backend plans them: float32 only (the bf16 kernel does not split causal keys)
    attn.cascade_plan = plan_cascade(attn, q_dtype, q.device, min_run=min_run, short_context=short, by_slot=by_slot,
                                     whole_chunks=by_slot and q_dtype == torch.float32)
    out = paged_attention(q, k, v, kv_cache, attn, d**-0.5, cpu_kernel="native")
    assert out.dtype == q_dtype and out.shape == q.shape
    err = (out.double() - _reference(q, kv_cache, attn, d**-0.5)).abs().max().item()
    assert err < max(TOL[q_dtype], TOL[kv_dtype]), f"{path} {q_dtype}/{kv_dtype}: max error {err:.2e}"


@pytest.mark.skipif(not native.can_run(spec=native.F32), reason="the float32 kernel needs AVX2 and FMA")
def test_by_slot_plans_put_every_decode_tail_in_the_one_call(monkeypatch):
    """A kernel reading tails by slot and length pads nothing: by default a ``by_slot`` plan puts
    every decode's tail in the step's one tail call however long it is, where a by-run plan gives
    the ones past ``SHORT_CONTEXT`` calls of their own (here 2 tokens, so most tails pass it)."""
    import promptcache.model.cascade_plan as cascade_plan

    monkeypatch.setattr(cascade_plan, "SHORT_CONTEXT", 2)
    # (path, its decodes, the calls of their own a by-run plan gives them: a group's members' longer
    # tails as chunks, a lone decode's context as a group of one)
    for path, decodes, own_calls in (("two-groups", 3, 2), ("batched-decode", 3, 3)):
        q, k, v, kv_cache, attn = _setup(path, torch.float32, torch.float32, d=32)
        by_run = plan_cascade(attn, torch.float32, q.device)
        by_slot = plan_cascade(attn, torch.float32, q.device, by_slot=True)
        lone_groups = len(by_run.groups) if path == "batched-decode" else 0
        assert sum(not c.fresh for c in by_run.chunks) + lone_groups == own_calls
        assert by_slot.tail_rows is not None and by_slot.tail_rows.numel() == decodes
        assert all(c.fresh for c in by_slot.chunks)  # no decode has a call of its own
        assert by_slot.tail_only == (path == "batched-decode")  # lone decodes: no group calls at all
        assert by_slot.tail_mask is None and by_run.tail_mask is not None  # lengths, not a padding mask
        attn.cascade_plan = by_slot
        out = paged_attention(q, k, v, kv_cache, attn, 32**-0.5, cpu_kernel="native")
        err = (out.double() - _reference(q, kv_cache, attn, 32**-0.5)).abs().max().item()
        assert err < TOL[torch.float32], f"{path}: max error {err:.2e}"
        # the backend plans so while a tail's query heads fit one of the kernel's query blocks; past
        # that (the kernel would pack every tail up front) long tails keep calls of their own
        attn.num_kv_heads = KVH
        CascadeNative().prepare(attn, KVH * GROUP, torch.float32, q.device)
        assert attn.cascade_plan.tail_rows.numel() == decodes
        CascadeNative().prepare(attn, KVH * (native.query_block(torch.float32) + 1), torch.float32, q.device)
        plan = attn.cascade_plan
        assert sum(not c.fresh for c in plan.chunks) + (len(plan.groups) if lone_groups else 0) == own_calls


@pytest.mark.parametrize("path,whole", [("chunked-prefill", [0]), ("lone-chunks", [1, 3]), ("mixed", []),
                                        ("shared-chunks", []), ("decode", []), ("prefill", [])])
def test_by_slot_plans_attend_a_lone_chunk_whole(path, whole, monkeypatch):
    """A prefill chunk over a cached context no other sequence of the step shares is, in a ``by_slot``
    plan asking for whole chunks (the backend does in float32), one causal call over every slot of its
    context (its fresh ones stored first, last): not in the permuted batch, no group or chunk of its
    own, nothing merged — one kernel call, counted. Chunks sharing a prefix keep their group call;
    decodes and cold chunks are untouched; by-run plans keep the merge. The answer is the float64
    reference's, for every dtype pair (a bf16 query falls back to PyTorch's kernel with the causal
    mask aligned at the context's end)."""
    q, k, v, kv_cache, attn = _setup(path, torch.float32, torch.float32, d=32)
    plan = plan_cascade(attn, torch.float32, q.device, by_slot=True, whole_chunks=True)
    assert plan_cascade(attn, torch.float32, q.device, by_slot=True).whole == []  # only when asked
    attn.num_kv_heads = KVH  # the backend asks for them in float32 only
    CascadeNative().prepare(attn, KVH * GROUP, torch.float32, q.device)
    assert len(attn.cascade_plan.whole) == len(whole)
    CascadeNative().prepare(attn, KVH * GROUP, torch.bfloat16, q.device)
    assert attn.cascade_plan.whole == []
    assert [(lo, hi) for lo, hi, _ in plan.whole] == [tuple(attn.query_start_loc[i : i + 2]) for i in whole]
    for (lo, hi, idx), i in zip(plan.whole, whole, strict=True):
        assert idx.tolist() == [_slots(attn.context_runs[i])]
        assert plan.perm is None or not set(range(lo, hi)) & set(plan.perm.tolist())
    assert plan_cascade(attn, torch.float32, q.device).whole == []
    if not native.can_run(spec=native.F32):
        return
    calls: list[tuple[bool, bool]] = []
    flash = native.library_f32().flash

    def counted(q, k, v, scale, causal, num_threads=None, kv_lens=None, kv_idx=None):  # type: ignore[no-untyped-def]
        calls.append((causal, kv_idx is not None))
        return flash(q, k, v, scale, causal, num_threads, kv_lens, kv_idx)

    monkeypatch.setattr(native.library_f32(), "flash", counted)
    for q_dtype, kv_dtype in DTYPES:
        q, k, v, kv_cache, attn = _setup(path, q_dtype, kv_dtype, d=32)
        attn.cascade_plan = plan_cascade(attn, q_dtype, q.device, by_slot=True, whole_chunks=True)
        calls.clear()
        out = paged_attention(q, k, v, kv_cache, attn, 32**-0.5, cpu_kernel="native")
        err = (out.double() - _reference(q, kv_cache, attn, 32**-0.5)).abs().max().item()
        assert err < max(TOL[q_dtype], TOL[kv_dtype]), f"{path} {q_dtype}/{kv_dtype}: max error {err:.2e}"
        if q_dtype == torch.float32:
            assert calls.count((True, True)) == len(whole)  # causal by slot: only the whole chunks


def test_kernel_facts_match_their_sources():
    """The query block and head sizes the Python side plans by are the C kernels' own."""
    for spec in (native.BF16, native.F32):
        text = spec.sources[0].read_text()
        assert re.search(rf"#define QB {spec.query_block}\b", text)
        assert f"D % {spec.head_multiple} != 0 || D > MAXD" in text and "#define MAXD 256" in text


@pytest.mark.parametrize("q_dtype,kv_dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_deterministic_attention_row_does_not_depend_on_batch(q_dtype, kv_dtype):
    """A decode row's output is bit-identical alone, in a batch, or as part of a prefill chunk."""
    q, k, v, kv_cache, attn = _setup("cascade-decode", q_dtype, kv_dtype, seed=3)
    scale = D**-0.5
    batch = deterministic_attention(q, k, v, kv_cache.clone(), attn, scale, piece_tokens=8)
    for i in range(attn.num_seqs):
        one = AttentionMetadata(attn.slot_mapping[i : i + 1], [0, 1], attn.seq_lens[i : i + 1],
                                attn.context_runs[i : i + 1])
        alone = deterministic_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], kv_cache.clone(), one, scale, 8)
        assert torch.equal(alone[0], batch[i])
    # the same last query computed inside a 6-token chunk whose first 5 tokens are already cached
    table, start, _ = PATHS["cascade-decode"][1]
    cache = kv_cache.clone()
    paged_attention(q[1:2], k[1:2], v[1:2], cache, AttentionMetadata(
        attn.slot_mapping[1:2], [0, 1], attn.seq_lens[1:2], attn.context_runs[1:2]), scale)  # write it
    runs = _runs(table, start + 1)
    slots = _slots(runs)[start - 5 : start + 1]
    chunk_q = torch.cat([torch.randn(5, KVH * GROUP, D).to(q_dtype), q[1:2]])
    chunk_k = cache[0][:, slots].transpose(0, 1).to(q_dtype)
    chunk_v = cache[1][:, slots].transpose(0, 1).to(q_dtype)
    chunk = AttentionMetadata(torch.tensor(slots), [0, 6], [start + 1], [runs])
    out = deterministic_attention(chunk_q, chunk_k, chunk_v, cache, chunk, scale, piece_tokens=8)
    assert torch.equal(out[5], batch[1])


@pytest.mark.parametrize("path", list(PATHS))
def test_portable_kernel_in_query_slices(path, monkeypatch):
    """The portable kernel bounds each call's scores by slicing queries (a long chunk over a long
    context on a GPU): with a tiny bound every call is split, causal parts included."""
    import promptcache.model.kernels as kernels

    monkeypatch.setattr(kernels, "MATH_SCORES_MAX", 7)
    q, k, v, kv_cache, attn = _setup(path, torch.float32, torch.float32)
    scale = D**-0.5
    attn.cascade_plan = plan_cascade(attn, torch.float32, q.device, min_run=1, short_context=0)
    out = paged_attention(q, k, v, kv_cache, attn, scale, cpu_kernels=False)
    err = (out.double() - _reference(q, kv_cache, attn, scale)).abs().max().item()
    assert err < TOL[torch.float32], f"{path}: max error {err:.2e}"


@pytest.mark.parametrize("path,identity", [("decode", True), ("batched-decode", True), ("decodes-and-cold", False)])
def test_tail_only_steps_skip_the_merge(path, identity):
    """Steps of lone short decodes (no group, no chunk) take the tail call's output as is; the cases
    above run that path (``mixed-runs``), with and without cold rows beside it."""
    q, k, v, kv_cache, attn = _setup(path, torch.bfloat16, torch.bfloat16)
    plan = plan_cascade(attn, torch.bfloat16, q.device, min_run=8, short_context=256)
    assert plan.tail_only and plan.perm_identity == identity
    for other in ("cascade-decode", "mixed", "scattered-tails"):
        _, _, _, _, attn = _setup(other, torch.bfloat16, torch.bfloat16)
        assert not plan_cascade(attn, torch.bfloat16, q.device, min_run=8, short_context=256).tail_only
