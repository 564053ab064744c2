"""The last layer computes only the rows that sample (``attention.OutputRows``).

A step runs twice on one runner, with the pruning and without it (``last_layer_rows_only`` off: every
row computed): the same sampled tokens and logprobs (bit-identical in deterministic mode), the same K/V
bytes in every layer's cache — the rows that sample nothing still store their last-layer K/V — and
the last layer's MLP sees one row per sampling sequence instead of every row (none in a step that
samples nothing). Two step shapes: without decodes (the kept rows get attention metadata of their
own) and with one (every row attends by the step's plan, the rows are kept after). Every attention
backend, both residual paths (native fused norms and the plain one), q/k norms, a bf16 KV cache.
"""

from __future__ import annotations

import pytest
import torch

from promptcache import LLM, SamplingParams
from promptcache.engine.model_runner import SeqInput
from promptcache.model import backends, native
from promptcache.model.attention import AttentionMetadata, output_rows

GREEDY = SamplingParams(max_tokens=1, temperature=0.0, logprobs=3)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(10, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _step(decode: bool, sample_b: bool = True) -> list[SeqInput]:
    """A: a first chunk (40 tokens) that samples nothing; B: a chunk of 25 over 300 cached tokens
    (more than one 256-key piece; its first block shared with C); D: a cold sampling chunk of 30; E: a
    one-token prompt; C (``decode``): a decode over 20 tokens. Blocks of 16, the cached ones stored by
    ``_prefill_shared``."""
    seqs = [
        SeqInput("a", _ids(40, 1), 0, [40, 41, 42], False, GREEDY),
        SeqInput("b", _ids(25, 2), 300, list(range(21)), sample_b, GREEDY),
        SeqInput("d", _ids(30, 6), 0, [30, 31], True, GREEDY),
        SeqInput("e", _ids(1, 7), 0, [33], True, GREEDY),
    ]
    if decode:
        seqs.insert(2, SeqInput("c", _ids(1, 3), 20, [0, 25], True, GREEDY))
    return seqs


def _prefill_shared(runner) -> None:
    """The cached parts of B (slots 0-299) and C (0-15, 400-403) stored before the step."""
    runner.execute([SeqInput("b0", _ids(300, 4), 0, list(range(19)), False, GREEDY),
                    SeqInput("c0", _ids(4, 5), 16, [0, 25], False, GREEDY)])


def _run(runner, prune: bool, decode: bool, sample_b: bool = True):
    rows: list[int] = []
    last = runner.loaded.model.layers[-1].mlp
    handle = last.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
    runner.last_layer_rows_only = prune
    for kv in runner.kv_caches:
        kv.zero_()
    _prefill_shared(runner)
    rows.clear()
    out = runner.execute(_step(decode, sample_b))
    handle.remove()
    kv = [c.clone() for c in runner.kv_caches]
    return out, kv, rows


F32 = ("float32", "auto", "auto")  # weights, math, KV cache
# family, kernel mode, backend, deterministic, dtypes
CASES = [
    ("llama", "torch", None, False, F32),
    ("llama", "native", None, False, F32),
    ("qwen3", "native", None, False, F32),
    ("gpt2", "torch", None, False, F32),
    ("llama", "torch", "portable", False, F32),
    ("llama", "native", None, False, ("float32", "auto", "bfloat16")),
    ("llama", "torch", None, True, F32),
    ("gpt2", "torch", None, True, F32),
    # bf16 math, the dtype CPUs with AVX512-BF16 / AMX and GPUs compute in (forced here; bit-exact)
    ("llama", "torch", None, True, ("bfloat16", "bfloat16", "auto")),
]


@pytest.mark.parametrize("decode", [False, True], ids=["chunks", "with-decode"])
@pytest.mark.parametrize("family,kernels,backend,deterministic,dtypes", CASES,
                         ids=[f"{f}-{k}-{b or 'default'}{'-det' if d else ''}"
                              f"{'' if t == F32 else '-' + '-'.join(t)}" for f, k, b, d, t in CASES])
def test_last_layer_runs_only_sampling_rows(hf_checkpoints, monkeypatch, family, kernels, backend, deterministic,
                                            dtypes, decode):
    if kernels == "native" and not native.can_run(spec=native.F32):
        pytest.skip("the float32 kernels need AVX2 and FMA")
    monkeypatch.setenv("PROMPTCACHE_CPU_KERNELS", kernels)
    dtype, compute, kv_dtype = dtypes
    runner = LLM(str(hf_checkpoints[family]), dtype=dtype, compute_dtype=compute, kv_cache_dtype=kv_dtype,
                 num_blocks=64, device="cpu", deterministic=deterministic).engine.runner
    assert runner.compute_dtype == getattr(torch, dtype)
    if backend == "portable":
        runner.attention = backends.Portable()
    if kernels == "native" and not deterministic:  # the fused-norm residual path and our kernels, really
        assert runner.loaded.model.norm.native is not None and runner.attention.name == "cpu-native"
    full, kv_full, rows_full = _run(runner, prune=False, decode=decode)
    pruned, kv_pruned, rows_pruned = _run(runner, prune=True, decode=decode)
    # A 40, B 25, D 30, E 1 (C 1) rows; kept: B's last, D's last, E (and C)
    assert rows_full == [96 + decode] and rows_pruned == [3 + decode]
    assert all(torch.equal(a, b) for a, b in zip(kv_full, kv_pruned, strict=True))  # every row's K/V, every layer
    assert full.keys() == pruned.keys() == ({"b", "c", "d", "e"} if decode else {"b", "d", "e"})
    for rid in full:
        (tok_f, lp_f), (tok_p, lp_p) = full[rid], pruned[rid]
        assert tok_f == tok_p
        if deterministic:
            assert (lp_f.logprob, lp_f.top) == (lp_p.logprob, lp_p.top)
        else:
            assert lp_p.logprob == pytest.approx(lp_f.logprob, abs=1e-4)
            assert [t for t, _ in lp_p.top] == [t for t, _ in lp_f.top]


@pytest.mark.parametrize("decode", [False, True], ids=["chunks", "with-decode"])
def test_a_step_that_samples_nothing_skips_the_last_layer_but_its_kv(hf_checkpoints, monkeypatch, decode):
    monkeypatch.setenv("PROMPTCACHE_CPU_KERNELS", "torch")
    runner = LLM(str(hf_checkpoints["llama"]), dtype="float32", num_blocks=64, device="cpu").engine.runner
    steps = [s for s in _step(decode, sample_b=False) if s.request_id in ("a", "b", "c")]
    outs = []
    for prune in (False, True):
        runner.last_layer_rows_only = prune
        for kv in runner.kv_caches:
            kv.zero_()
        _prefill_shared(runner)
        rows: list[int] = []
        handle = runner.loaded.model.layers[-1].mlp.register_forward_hook(
            lambda _m, a, _o, seen=rows: seen.append(a[0].shape[0]))
        outs.append((runner.execute(steps), [c.clone() for c in runner.kv_caches], rows))
        handle.remove()
    (full, kv_full, rows_full), (pruned, kv_pruned, rows_pruned) = outs
    assert rows_full == [65 + decode] and rows_pruned == ([1] if decode else [])  # C's decode, or nothing at all
    assert all(torch.equal(a, b) for a, b in zip(kv_full, kv_pruned, strict=True))
    assert full.keys() == pruned.keys() == ({"c"} if decode else set())
    if decode:
        assert full["c"][0] == pruned["c"][0]


def test_output_rows_plan_the_kept_rows_only_without_decodes():
    """Chunks only: the kept rows get metadata of their own (one-token queries over whole contexts);
    with a decode in the step none (the step's plan attends every row); decodes only: no pruning."""
    def meta(lens: list[int], ctx: list[int]) -> AttentionMetadata:
        qsl = [0]
        for n in lens:
            qsl.append(qsl[-1] + n)
        return AttentionMetadata(torch.arange(qsl[-1]) + 100, qsl, ctx, [[(16 * i, c)] for i, c in enumerate(ctx)])

    chunks = output_rows(meta([5, 3], [5, 9]), [0, 1])
    assert chunks is not None and chunks.attn is not None
    assert chunks.rows.tolist() == [4, 7] and chunks.attn.slot_mapping.tolist() == [104, 107]
    assert chunks.attn.query_start_loc == [0, 1, 2] and chunks.attn.seq_lens == [5, 9]
    assert chunks.attn.context_runs == [[(0, 5)], [(16, 9)]]
    mixed = output_rows(meta([5, 1], [5, 9]), [0, 1])
    assert mixed is not None and mixed.attn is None and mixed.rows.tolist() == [4, 5]
    assert output_rows(meta([1, 1], [7, 9]), [0, 1]) is None
    nothing = output_rows(meta([5], [5]), [])
    assert nothing is not None and nothing.rows.numel() == 0 and nothing.attn is not None
    # a one-token chunk that samples nothing beside a longer one: no row to keep, no kernel on none
    nothing = output_rows(meta([5, 1], [5, 9]), [])
    assert nothing is not None and nothing.rows.numel() == 0 and nothing.attn is not None
