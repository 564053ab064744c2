"""Every (dtype, compute policy) the engine can choose, on any machine, against transformers.

A CPU without native 16-bit math would never run the native-bf16 path by itself (that is how a
crash on native-bf16 CPUs went unnoticed), so ``compute_dtype`` forces each policy here. One batch
covers every stage: a prefill that fits the step budget, a chunked prefill, decode alone and in a
batch, and — with the cache on — cascade decode over a shared cached prefix.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import promptcache.model.cascade_plan as cascade_plan
from promptcache import LLM, SamplingParams
from promptcache.engine.model_runner import ModelRunner

# (weights dtype, compute dtype): native 16-bit math and the float32 upcast path, forced
POLICIES = [("float32", "float32"), ("bfloat16", "bfloat16"), ("bfloat16", "float32"),
            ("float16", "float16"), ("float16", "float32")]
# largest |logprob - transformers'| over tokens where the greedy prefixes agree (measured: 1e-6 for
# float32 math, 3e-2 native bf16, 4e-3 native fp16)
TOL = {("float32", "float32"): 1e-4, ("bfloat16", "bfloat16"): 8e-2, ("bfloat16", "float32"): 1e-4,
       ("float16", "float16"): 1e-2, ("float16", "float32"): 1e-4}
NUM_TOKENS = 8
BUDGET = 64  # max_num_batched_tokens: the 150-token prompt is chunked


def prompt_of(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 4000, (length,), generator=g).tolist()


SHARED = prompt_of(100, seed=1)
PROMPTS = [prompt_of(40, seed=2), prompt_of(150, seed=3)] + [SHARED + prompt_of(20, seed=10 + i) for i in range(3)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from conftest import save_hf_checkpoint

    return save_hf_checkpoint("llama", tmp_path_factory.mktemp("precision") / "llama", seed=4)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])]


@functools.cache
def transformers_reference(
    path: str, dtype: str, compute: str, device: str = "cpu"
) -> list[tuple[list[int], list[torch.Tensor]]]:
    """Greedy tokens and their logprobs from transformers. For the upcast policy: float32 math on
    weights rounded to the 16-bit dtype (what promptcache computes there)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, compute)).to(device).eval()
    if compute != dtype:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(getattr(torch, dtype)).float())
    refs = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt], device=device)
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NUM_TOKENS,
                min_new_tokens=NUM_TOKENS, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
            )
        tokens = out.sequences[0, len(prompt) :].tolist()
        refs.append((tokens, [torch.log_softmax(lg[0].float(), -1).cpu() for lg in out.logits]))  # [vocab] per step
    return refs


@functools.cache
def run_cell(path: str, dtype: str, compute: str, cache: bool, device: str = "cpu"):
    """Generate the batch, then prompt 0 alone; record what the runner and attention did."""
    seen = {"chunked": 0, "decode_batch": 0, "cascade_group": 0}
    plan, execute = cascade_plan.plan_cascade, ModelRunner.execute

    def spy_plan(attn, *args, **kwargs):
        p = plan(attn, *args, **kwargs)
        # a chunk alone on its cached context is a group of one, or (by_slot plans) attended whole
        seen["cascade_group"] = max([seen["cascade_group"]] + [g.num_seqs for g in p.groups] + [1] * len(p.whole))
        return p

    def spy_execute(self, seqs):
        seen["chunked"] += sum(s.start_pos > 0 and len(s.token_ids) > 1 for s in seqs)
        seen["decode_batch"] = max(seen["decode_batch"], sum(len(s.token_ids) == 1 for s in seqs))
        return execute(self, seqs)

    llm = LLM(path, dtype=dtype, compute_dtype=compute, num_blocks=128, max_num_batched_tokens=BUDGET,
              enable_prefix_caching=cache, device=device)
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True, logprobs=5)
    cascade_plan.plan_cascade, ModelRunner.execute = spy_plan, spy_execute  # type: ignore[method-assign]
    try:
        batch = llm.generate(PROMPTS, params)
        alone = llm.generate([PROMPTS[0]], params)[0]
    finally:
        cascade_plan.plan_cascade, ModelRunner.execute = plan, execute  # type: ignore[method-assign]
    return llm.engine.runner, batch, alone, seen


def _check_against(out, ref_tokens: list[int], ref_logprob, tol: float) -> bool:
    """Logprobs agree within ``tol`` while the greedy tokens agree; at the first flip the two
    tokens were a near-tie for the reference (within ``tol``), so rounding explains it. True when
    the whole sequence agrees. ``ref_logprob(step, token)`` is the reference's logprob."""
    for i, tok in enumerate(ref_tokens):
        assert abs(out.logprobs[i].logprob - ref_logprob(i, out.token_ids[i])) < tol
        if out.token_ids[i] != tok:
            gap = ref_logprob(i, tok) - ref_logprob(i, out.token_ids[i])
            assert 0 <= gap < tol, f"step {i}: flipped {tok} -> {out.token_ids[i]} with a gap of {gap:.3g}"
            return False  # after a flip the contexts differ: nothing more to compare
    return True


def _ours(out):
    """``ref_logprob`` over one of our outputs (its sampled token and top-5 logprobs)."""
    def lookup(step: int, token: int) -> float:
        top = dict(out.logprobs[step].top)
        top[out.logprobs[step].token_id] = out.logprobs[step].logprob
        assert token in top, f"step {step}: token {token} not in the top 5"
        return top[token]
    return lookup


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache", [True, False], ids=["cache-on", "cache-off"])
@pytest.mark.parametrize("dtype,compute", POLICIES, ids=[f"{d}-{c}-math" for d, c in POLICIES])
def test_policy_matches_transformers(checkpoint, dtype, compute, cache, device):
    runner, batch, alone, seen = run_cell(str(checkpoint), dtype, compute, cache, device)
    assert runner.compute_dtype == getattr(torch, compute) and runner.dtype == getattr(torch, dtype)
    assert runner.device.type == device and runner.kv_caches[0].device.type == device
    # every stage ran: chunked prefill, decode in a batch, cascade over the cached prefix (cache on;
    # every device runs the same plan, with its own kernel)
    assert seen["chunked"] >= 2 and seen["decode_batch"] >= 4
    assert seen["cascade_group"] >= (3 if cache else 1)
    assert [o.usage.cached_tokens for o in batch] == ([0, 0, 0, 96, 96] if cache else [0] * 5)
    refs = transformers_reference(str(checkpoint), dtype, compute, device)
    tol = TOL[(dtype, compute)]
    same = [_check_against(out, toks, lambda i, t, lps=lps: lps[i][t].item(), tol)
            for out, (toks, lps) in zip(batch, refs, strict=True)]
    # float32 math is exact to ~1e-6: every sequence; 16-bit math rounds differently from
    # transformers (other kernels, other splits), so a near-tie may flip (checked above)
    if compute == "float32":
        assert all(same)
    # batch-1 decode vs the same prompt decoded in a batch of five
    _check_against(alone, batch[0].token_ids, _ours(batch[0]), tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,compute", POLICIES, ids=[f"{d}-{c}-math" for d, c in POLICIES])
def test_cache_on_agrees_with_cache_off(checkpoint, dtype, compute, device):
    _, on, _, _ = run_cell(str(checkpoint), dtype, compute, True, device)
    _, off, _, _ = run_cell(str(checkpoint), dtype, compute, False, device)
    if compute == "float32":
        assert [a.token_ids for a in on] == [b.token_ids for b in off]
        diffs = [abs(x.logprob - y.logprob) for a, b in zip(on, off, strict=True)
                 for x, y in zip(a.logprobs, b.logprobs, strict=True)]
        assert max(diffs) < 2e-5
    else:  # 16-bit math: bit-exact only in deterministic mode (test_deterministic.py)
        for a, b in zip(on, off, strict=True):
            _check_against(a, b.token_ids, _ours(b), TOL[(dtype, compute)])


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_greedy_matches_cpu_float32_math(checkpoint, dtype):
    """CUDA against the CPU engine computing in float32 on the same (dtype-rounded) weights."""
    _, gpu, _, _ = run_cell(str(checkpoint), dtype, dtype, True, "cuda")
    _, cpu, _, _ = run_cell(str(checkpoint), dtype, "float32", True, "cpu")
    tol = TOL[(dtype, dtype)]
    for g, c in zip(gpu, cpu, strict=True):
        _check_against(g, c.token_ids, _ours(c), tol)


def test_compute_dtype_is_validated():
    with pytest.raises(ValueError, match="float32 or in the weights' own dtype"):
        LLM("random:tiny", dtype="bfloat16", compute_dtype="float16", num_blocks=8)
    with pytest.raises(ValueError, match="compute_dtype must be"):
        LLM("random:tiny", compute_dtype="int8", num_blocks=8)


def test_engine_says_which_policy_it_runs():
    from promptcache.engine.precision import cpu_has_native_bf16

    auto = LLM("random:tiny", num_blocks=8, device="cpu").engine.precision
    native = cpu_has_native_bf16()
    expected = "cpu, bfloat16 math (native), bfloat16 KV cache" if native else "cpu, float32 math, float32 KV cache"
    assert auto == expected
    forced = LLM("random:tiny", dtype="bfloat16", compute_dtype="float32", kv_cache_dtype="bfloat16",
                 deterministic=True, num_blocks=8, device="cpu").engine.precision
    assert forced == "cpu, float32 math on bfloat16 weights, bfloat16 KV cache, deterministic"
