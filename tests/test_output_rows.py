"""The last layer computes only the rows that sample (``attention.OutputRows``).

A step runs twice on one runner, with the pruning and without it (``last_layer_rows_only`` off: every
row computed): the same sampled tokens and logprobs (bit-identical in deterministic mode), the same K/V
bytes in every layer's cache — the rows that sample nothing still store their last-layer K/V — and
the last layer's MLP sees one row per sampling sequence instead of every row (none in a step that
samples nothing). Every attention backend, both residual paths (native fused norms and the plain
one), both model families.
"""

from __future__ import annotations

import pytest
import torch

from promptcache import LLM, SamplingParams
from promptcache.engine.model_runner import SeqInput
from promptcache.model import backends, native

GREEDY = SamplingParams(max_tokens=1, temperature=0.0, logprobs=3)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(10, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _step(runner, sample_b: bool = True) -> list[SeqInput]:
    """A: a first chunk (40 tokens) that samples nothing; B: a chunk of 25 over 30 cached tokens (a
    shared block with C); C: a decode over 20 tokens. Blocks of 16: disjoint but B's and C's first."""
    return [
        SeqInput("a", _ids(40, 1), 0, [10, 11, 12], False, GREEDY),
        SeqInput("b", _ids(25, 2), 30, [0, 1, 2, 3], sample_b, GREEDY),
        SeqInput("c", _ids(1, 3), 20, [0, 5], True, GREEDY),
    ]


def _prefill_shared(runner) -> None:
    """The cached parts of B (slots 0-29) and C (0-15, 80-99) stored before the step."""
    runner.execute([SeqInput("b0", _ids(30, 4), 0, [0, 1], False, GREEDY),
                    SeqInput("c0", _ids(4, 5), 16, [0, 5], False, GREEDY)])


def _run(runner, prune: bool, sample_b: bool = True):
    rows: list[int] = []
    last = runner.loaded.model.layers[-1].mlp
    handle = last.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
    runner.last_layer_rows_only = prune
    for kv in runner.kv_caches:
        kv.zero_()
    _prefill_shared(runner)
    rows.clear()
    out = runner.execute(_step(runner, sample_b))
    handle.remove()
    kv = [c[:, :, :200].clone() for c in runner.kv_caches]
    return out, kv, rows


CASES = [
    ("llama", "torch", None, False),
    ("llama", "native", None, False),
    ("gpt2", "torch", None, False),
    ("llama", "torch", "portable", False),
    ("llama", "torch", None, True),
    ("gpt2", "torch", None, True),
]


@pytest.mark.parametrize("family,kernels,backend,deterministic", CASES,
                         ids=[f"{f}-{k}-{b or 'default'}{'-det' if d else ''}" for f, k, b, d in CASES])
def test_last_layer_runs_only_sampling_rows(hf_checkpoints, monkeypatch, family, kernels, backend, deterministic):
    if kernels == "native" and not native.can_run(spec=native.F32):
        pytest.skip("the float32 kernels need AVX2 and FMA")
    monkeypatch.setenv("PROMPTCACHE_CPU_KERNELS", kernels)
    runner = LLM(str(hf_checkpoints[family]), dtype="float32", num_blocks=16, device="cpu",
                 deterministic=deterministic).engine.runner
    if backend == "portable":
        runner.attention = backends.Portable()
    if kernels == "native":  # the fused-norm residual path and our kernels, really
        assert runner.loaded.model.norm.native is not None and runner.attention.name == "cpu-native"
    full, kv_full, rows_full = _run(runner, prune=False)
    pruned, kv_pruned, rows_pruned = _run(runner, prune=True)
    assert rows_full == [40 + 25 + 1] and rows_pruned == [2]  # B's last row and C's decode
    assert all(torch.equal(a, b) for a, b in zip(kv_full, kv_pruned, strict=True))  # every row's K/V, every layer
    assert full.keys() == pruned.keys() == {"b", "c"}
    for rid in full:
        (tok_f, lp_f), (tok_p, lp_p) = full[rid], pruned[rid]
        assert tok_f == tok_p
        if deterministic:
            assert (lp_f.logprob, lp_f.top) == (lp_p.logprob, lp_p.top)
        else:
            assert lp_p.logprob == pytest.approx(lp_f.logprob, abs=1e-4)
            assert [t for t, _ in lp_p.top] == [t for t, _ in lp_f.top]


def test_a_step_that_samples_nothing_skips_the_last_layer_but_its_kv(hf_checkpoints, monkeypatch):
    runner = LLM(str(hf_checkpoints["llama"]), dtype="float32", num_blocks=16, device="cpu").engine.runner
    full, kv_full, rows_full = _run(runner, prune=False, sample_b=False)
    pruned, kv_pruned, rows_pruned = _run(runner, prune=True, sample_b=False)
    assert rows_full == [66] and rows_pruned == [1]  # C's decode only
    assert all(torch.equal(a, b) for a, b in zip(kv_full, kv_pruned, strict=True))
    assert full.keys() == pruned.keys() == {"c"}
    steps = [SeqInput("a", _ids(40, 1), 0, [10, 11, 12], False, GREEDY)]
    rows: list[int] = []
    handle = runner.loaded.model.layers[-1].mlp.register_forward_hook(lambda _m, a, _o: rows.append(a[0].shape[0]))
    assert runner.execute(steps) == {}
    handle.remove()
    assert rows == []  # nothing past the last layer's K/V
