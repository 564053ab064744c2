"""Deterministic mode: a sequence's logprobs are bit-identical whatever happened around it.

Cache on or off, alone or in a batch of eight, with a step budget that chunks prompts at other
places, and a follow-up prompt whose earlier answer was computed by decode steps (cache on: reused
from the cache) or by a prefill (cache off). Exact equality, in every dtype and compute policy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from promptcache import LLM, SamplingParams

POLICIES = [("float32", "float32"), ("bfloat16", "bfloat16"), ("bfloat16", "float32"), ("float16", "float16")]
NUM_TOKENS = 12


def prompt_of(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 4000, (length,), generator=g).tolist()


# two groups sharing long prefixes (more than one 256-key attention piece) plus two loners
PREFIXES = [prompt_of(300, seed=1), prompt_of(170, seed=2)]
PROMPTS = [PREFIXES[i % 2] + prompt_of(10 + 7 * i, seed=20 + i) for i in range(6)] + [
    prompt_of(45, seed=40), prompt_of(333, seed=41)
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from conftest import save_hf_checkpoint

    return save_hf_checkpoint("llama", tmp_path_factory.mktemp("det") / "llama", seed=5)


def _logprobs(outs) -> list[list[tuple[int, float, tuple]]]:
    return [[(lp.token_id, lp.logprob, lp.top) for lp in o.logprobs] for o in outs]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])])
@pytest.mark.parametrize("dtype,compute", POLICIES, ids=[f"{d}-{c}-math" for d, c in POLICIES])
def test_logprobs_bit_identical_across_cache_batch_and_budget(checkpoint, dtype, compute, device):
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True, logprobs=3)

    def engine(cache: bool, budget: int) -> LLM:
        return LLM(str(checkpoint), dtype=dtype, compute_dtype=compute, deterministic=True, num_blocks=512,
                   enable_prefix_caching=cache, max_num_batched_tokens=budget, device=device)

    cached = engine(True, 2048)
    batch = cached.generate(PROMPTS, params)
    assert sum(o.usage.cached_tokens for o in batch) > 0  # the cache was really used
    reference = _logprobs(batch)
    assert _logprobs(engine(False, 2048).generate(PROMPTS, params)) == reference
    # one at a time: each later prompt of a group reuses its prefix from the cache
    singles = engine(True, 2048)
    assert _logprobs([singles.generate([p], params)[0] for p in PROMPTS]) == reference
    # other chunk boundaries (48 and 80 tokens a step), cache on and off
    assert _logprobs(engine(True, 48).generate(PROMPTS, params)) == reference
    assert _logprobs(engine(False, 80).generate(PROMPTS, params)) == reference

    # a follow-up turn: with the cache on, the first answer's K/V come from its decode steps
    follow = [p + o.token_ids + prompt_of(9, seed=60 + i) for i, (p, o) in enumerate(zip(PROMPTS, batch, strict=True))]
    on = cached.generate(follow, params)
    assert sum(o.usage.cached_tokens for o in on) > sum(len(p) for p in PROMPTS[:6]) // 2
    assert _logprobs(on) == _logprobs(engine(False, 64).generate(follow, params))


def test_default_mode_is_not_tiled(checkpoint):
    """The switch really switches: default linears and attention are the fast, shape-dependent ones."""
    from promptcache.model.transformer import Linear

    fast = LLM(str(checkpoint), dtype="float32", num_blocks=64, device="cpu").engine.runner.loaded.model
    det_llm = LLM(str(checkpoint), dtype="float32", num_blocks=64, deterministic=True, device="cpu")
    det = det_llm.engine.runner.loaded.model
    assert not any(m.row_tiled for m in fast.modules() if isinstance(m, Linear))
    assert all(m.row_tiled for m in det.modules() if isinstance(m, Linear))
    from promptcache.model import native

    fast_attention = "cpu-native" if native.native_f32() else "cpu-cascade"  # float32: our AVX2 kernels where picked
    assert fast_llm_backend(checkpoint) == fast_attention and det_llm.engine.runner.attention.name == "deterministic"


def fast_llm_backend(checkpoint) -> str:
    return LLM(str(checkpoint), dtype="float32", num_blocks=64, device="cpu").engine.runner.attention.name


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_other_families_are_bit_identical_too(tmp_path, family):
    """LayerNorm, GELU and learned positions (GPT-2); q/k norms and tied embeddings (Qwen3)."""
    from conftest import save_hf_checkpoint

    path = str(save_hf_checkpoint(family, tmp_path / family, seed=6))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)

    def run(cache: bool, budget: int, batch: bool):
        llm = LLM(path, dtype="bfloat16", compute_dtype="bfloat16", deterministic=True, num_blocks=256,
                  enable_prefix_caching=cache, max_num_batched_tokens=budget, device="cpu")
        outs = llm.generate(PROMPTS, params) if batch else [llm.generate([p], params)[0] for p in PROMPTS]
        return _logprobs(outs)

    reference = run(True, 2048, True)
    assert run(False, 64, True) == reference
    assert run(True, 48, False) == reference


def test_the_model_never_picks_an_attention_kernel_itself(checkpoint):
    """The runner's backend is the one choice: metadata without one is refused, not defaulted."""
    from promptcache.model.attention import AttentionMetadata

    runner = LLM(str(checkpoint), dtype="float32", num_blocks=8, deterministic=True, device="cpu").engine.runner
    attn = AttentionMetadata(torch.tensor([0, 1]), [0, 2], [2], [[(0, 2)]], num_kv_heads=2)
    with pytest.raises(ValueError, match="backend is not set"):
        runner.loaded.model(torch.tensor([5, 6]), torch.tensor([0, 1]), attn, runner.kv_caches)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_panels_replace_the_row_tiles(tmp_path, monkeypatch, family):
    """Float32 math on a bf16 checkpoint with our float32 kernels: the linears' bf16-panel GEMM gives a
    row the same bits alone or in any batch, so deterministic mode takes it instead of 32-row tiles
    (norms stay tiled); logprobs stay bit-identical across cache, batch and chunking, and the cache
    namespace frames the kernel (its K/V differ in the last bits from the row tiles')."""
    from conftest import save_hf_checkpoint

    from promptcache.model import native
    from promptcache.model.transformer import Linear

    if not native.can_run(spec=native.F32):
        pytest.skip("the float32 kernels need AVX2 and FMA")
    monkeypatch.setenv("PROMPTCACHE_CPU_KERNELS", "native")
    path = str(save_hf_checkpoint(family, tmp_path / family, seed=7))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)

    def engine(cache: bool, budget: int) -> LLM:
        return LLM(path, dtype="bfloat16", compute_dtype="float32", deterministic=True, num_blocks=256,
                   enable_prefix_caching=cache, max_num_batched_tokens=budget, device="cpu")

    cached = engine(True, 2048)
    model = cached.engine.runner.loaded.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.w16 is not None and not m.row_tiled for m in linears)
    assert all(m.row_tiled for m in model.modules() if hasattr(m, "row_tiled") and not isinstance(m, Linear))
    assert cached.engine.namespace.linears == "bf16-panels"
    batch = cached.generate(PROMPTS, params)
    assert sum(o.usage.cached_tokens for o in batch) > 0
    reference = _logprobs(batch)
    assert _logprobs(engine(False, 64).generate(PROMPTS, params)) == reference
    singles = engine(True, 48)
    assert _logprobs([singles.generate([p], params)[0] for p in PROMPTS]) == reference
    monkeypatch.setenv("PROMPTCACHE_CPU_KERNELS", "torch")  # row tiles again, another namespace
    tiled = engine(True, 2048)
    assert all(m.row_tiled and m.w16 is None for m in tiled.engine.runner.loaded.model.modules()
               if isinstance(m, Linear))
    assert tiled.engine.namespace.linears == ""
    assert tiled.engine.namespace.root(None) != cached.engine.namespace.root(None)
