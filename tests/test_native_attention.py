"""The native bf16 attention kernel (model/native.py, csrc/flash_bf16.c) against float64 attention.

It builds with the machine's C compiler on every x86-64 machine; it runs only on CPUs with
AVX512-BF16 (the run tests skip elsewhere, as GPU tests do without a GPU).
"""

from __future__ import annotations

import math
import platform

import pytest
import torch

from promptcache.model import native
from promptcache.model.backends import pick_backend
from promptcache.model.kernels import cpu_flash

runs_here = pytest.mark.skipif(not native.can_run(), reason="the native kernel needs a CPU with AVX512-BF16")


def _reference(q, k, v, scale, causal):
    """float64 attention and its log-sum-exp; query i of M sees keys [0, N - M + i] when causal."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    m, n = q.shape[2], k.shape[2]
    if causal:
        s = s.masked_fill(torch.ones(m, n, dtype=torch.bool).triu(n - m + 1), -math.inf)
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse.unsqueeze(-1)) @ vv, lse


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 intrinsics")
def test_builds_with_the_machines_compiler(tmp_path):
    """Where it cannot run, it must still compile (a broken source must not hide on AVX2 machines)."""
    path = native.build(tmp_path)
    assert path.exists() and path.stat().st_size > 0
    assert native.build(tmp_path) == path  # cached by content: no second compile


def test_a_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    """``library()`` turns this into a warning and PyTorch's kernels; ``build`` says what is wrong."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="no-such-cc"):
        native.build(tmp_path)
    monkeypatch.setenv("CC", "false")  # runs, fails to compile
    with pytest.raises(RuntimeError, match="could not build"):
        native.build(tmp_path)


# (batch, query heads, KV heads, queries, keys, head size, causal)
SHAPES = [
    (1, 9, 3, 1, 1, 64, False),  # one key
    (1, 9, 3, 64, 64, 64, True),  # a causal chunk, grouped heads
    (1, 9, 3, 203, 203, 64, True),  # rows not a multiple of the 4-row micro-kernel nor of the 32-row block
    (1, 3, 3, 24, 2048, 64, False),  # a decode group: few rows, keys split across threads and merged
    (1, 3, 3, 7, 1337, 64, False),  # a split whose last part is short
    (2, 4, 2, 37, 300, 128, False),  # two sequences, head size 128
    (1, 2, 1, 5, 1000, 96, False),  # head size 96: a 64-wide and a 32-wide pass
    (3, 2, 2, 3, 17, 32, False),  # batched short keys (tiles padded with zero keys)
    (1, 4, 4, 40, 600, 64, True),  # causal with fewer queries than keys: aligned at the end
]


@runs_here
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(shape):
    b, h, kvh, m, n, d, causal = shape
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    q, k, v = (torch.randn(b, heads, length, d, generator=g).bfloat16()
               for heads, length in ((h, m), (kvh, n), (kvh, n)))
    lib = native.library()
    assert lib is not None
    res = lib.flash(q, k, v, d**-0.5, causal)
    assert res is not None
    out, lse = res
    ref_out, ref_lse = _reference(q, k, v, d**-0.5, causal)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape and lse.shape == q.shape[:3]
    # bf16 output (half an ulp of values up to ~3) and p rounded to bf16 before p . v, as PyTorch's kernel
    assert (out.double() - ref_out).abs().max().item() < 2e-2
    assert (lse.double() - ref_lse).abs().max().item() < 1e-4
    # and as close to PyTorch's own flash kernel as that kernel is to float64
    if kvh == h and causal == (m == n):
        t_out, _ = cpu_flash(q, k, v, d**-0.5, None, causal)
        t_err = (t_out.double() - ref_out).abs().max().item()
        assert (out.double() - ref_out).abs().max().item() <= 2 * t_err + 1e-3


@runs_here
def test_reads_strided_views_in_place():
    """K/V as views of a head-major cache (a run of slots), q as a transposed view: no copies needed."""
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(2, 3, 500, 64, generator=g).bfloat16()  # [k|v, kvh, slots, d]
    k, v = cache[0, :, 100:400].unsqueeze(0), cache[1, :, 100:400].unsqueeze(0)
    q = torch.randn(50, 9, 64, generator=g).bfloat16().transpose(0, 1).unsqueeze(0)  # [1, 9, 50, 64], strided
    lib = native.library()
    assert lib is not None
    res = lib.flash(q, k, v, 0.125, False)
    assert res is not None
    ref_out, ref_lse = _reference(q, k, v, 0.125, False)
    assert (res[0].double() - ref_out).abs().max().item() < 2e-2
    assert (res[1].double() - ref_lse).abs().max().item() < 1e-4


@runs_here
@pytest.mark.parametrize("threads", [1, 2])
def test_sequences_of_their_own_lengths(threads):
    """``kv_lens``: each sequence of the batch reads its own first keys (the decode tails' call);
    what lies past them — NaN here — is never read, not even as masked padding."""
    g = torch.Generator().manual_seed(4)
    lens = [5, 70, 1, 64, 300]
    n = max(lens)
    q = torch.randn(len(lens), 3, 3, 64, generator=g).bfloat16()
    k = torch.randn(len(lens), 3, n, 64, generator=g).bfloat16()
    v = torch.randn(len(lens), 3, n, 64, generator=g).bfloat16()
    for b, length in enumerate(lens):
        k[b, :, length:] = v[b, :, length:] = float("nan")
    lib = native.library()
    assert lib is not None
    res = lib.flash(q, k, v, 0.125, False, threads, kv_lens=torch.tensor(lens))
    assert res is not None
    for b, length in enumerate(lens):
        ref_out, ref_lse = _reference(q[b : b + 1], k[b : b + 1, :, :length], v[b : b + 1, :, :length], 0.125, False)
        assert (res[0][b].double() - ref_out[0]).abs().max().item() < 2e-2
        assert (res[1][b].double() - ref_lse[0]).abs().max().item() < 1e-4


@runs_here
def test_reads_keys_by_slot_from_a_paged_cache():
    """``kv_idx``: each sequence's keys are rows of the cache (its slots, in any order) read in
    place, with ``kv_lens`` — the decode tails' call without a gather."""
    g = torch.Generator().manual_seed(6)
    cache = torch.randn(2, 3, 400, 64, generator=g).bfloat16()  # [k|v, kvh, slots, d]
    lens = [9, 40, 1]
    idx = torch.zeros(len(lens), max(lens), dtype=torch.long)
    for b, length in enumerate(lens):
        idx[b, :length] = torch.randperm(400, generator=g)[:length]
    q = torch.randn(len(lens), 3, 3, 64, generator=g).bfloat16()
    lib = native.library()
    assert lib is not None
    res = lib.flash(q, cache[0], cache[1], 0.125, False, kv_lens=torch.tensor(lens), kv_idx=idx)
    assert res is not None
    for b, length in enumerate(lens):
        k, v = cache[0][:, idx[b, :length]].unsqueeze(0), cache[1][:, idx[b, :length]].unsqueeze(0)
        ref_out, ref_lse = _reference(q[b : b + 1], k, v, 0.125, False)
        assert (res[0][b].double() - ref_out[0]).abs().max().item() < 2e-2
        assert (res[1][b].double() - ref_lse[0]).abs().max().item() < 1e-4


GUARD_PAGE_PROBE = """
import ctypes, mmap, sys, torch
from promptcache.model import native
n, d = 17, 64
mm = mmap.mmap(-1, 2 * 4096)
base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
assert libc.mprotect(base + 4096, 4096, 0) == 0  # the second page: no access
idx = torch.frombuffer(mm, dtype=torch.int64, count=n, offset=4096 - 8 * n).view(1, n)  # ends at the page
idx.copy_(torch.arange(n).view(1, n))
cache = torch.randn(1, 32, d).bfloat16()
res = native.library().flash(torch.randn(1, 1, 1, d).bfloat16(), cache, cache, 0.125, False, kv_idx=idx)
assert res is not None and torch.isfinite(res[1]).all()
"""


@runs_here
def test_slot_index_is_not_read_past_its_end():
    """Keys are padded to 64 inside the kernel; the slot index must be read only for real keys (an
    index ending right before an unreadable page crashed the process: run apart, so a crash is a
    failure here, not the end of the suite)."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", GUARD_PAGE_PROBE], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


@runs_here
def test_write_kv_matches_index_copy():
    from promptcache.model.attention import write_kv

    g = torch.Generator().manual_seed(7)
    ours, theirs = (torch.zeros(2, 3, 64, 32, dtype=torch.bfloat16) for _ in range(2))
    qkv = torch.randn(10, 9 + 6, 32, generator=g).bfloat16()
    k, v = qkv[:, 9:12], qkv[:, 12:]  # strided views, as the model hands them over
    slots = torch.tensor([5, 6, 7, 40, 41, 63, 0, 1, 2, 3])
    lib = native.library()
    assert lib is not None
    lib.write_kv(ours, k, v, slots)
    write_kv(theirs, k, v, slots)
    assert torch.equal(ours, theirs)


@runs_here
def test_declines_what_it_does_not_take():
    lib = native.library()
    assert lib is not None
    q = torch.randn(1, 2, 4, 48).bfloat16()  # head size not a multiple of 32
    assert lib.flash(q, q, q, 0.1, False) is None
    q = torch.randn(1, 2, 4, 64).bfloat16()
    assert lib.flash(q, q[..., ::2, :], q[..., ::2, :], 0.1, False) is not None
    assert lib.flash(q.transpose(-1, -2).contiguous().transpose(-1, -2), q, q, 0.1, False) is None  # d strided


def test_mode_switch(monkeypatch):
    can = native.can_run()
    monkeypatch.setenv("PROMPTCACHE_CPU_KERNELS", "torch")
    assert not native.native_attention() and not native.native_ops()
    assert pick_backend(torch.device("cpu"), False, torch.bfloat16).name == "cpu-cascade"
    monkeypatch.setenv("PROMPTCACHE_CPU_KERNELS", "auto")
    assert native.native_attention(flags={"avx512_bf16"}) == can
    assert not native.native_attention(flags={"avx512_bf16", "amx_bf16"})  # PyTorch's AMX flash kernel
    assert native.native_ops() == can  # row-wise ops wherever they run, AMX CPUs included
    monkeypatch.setenv("PROMPTCACHE_CPU_KERNELS", "native")
    assert native.native_attention(flags={"avx512_bf16", "amx_bf16"}) == can
    name = "cpu-native" if can else "cpu-cascade"
    assert pick_backend(torch.device("cpu"), False, torch.bfloat16).name == name
    monkeypatch.setenv("PROMPTCACHE_CPU_KERNELS", "fast")
    with pytest.raises(ValueError, match="PROMPTCACHE_CPU_KERNELS"):
        native.native_ops()


@runs_here
@pytest.mark.parametrize("cache", [True, False], ids=["cache-on", "cache-off"])
def test_engine_runs_it_and_agrees_with_transformers(tmp_path, monkeypatch, cache):
    """A bf16 engine forced onto the native kernel (head size 32, grouped heads): chunked prefill,
    cascade decode over a cached prefix and batched decode all call it, and greedy tokens and
    logprobs agree with transformers (float32 math on the same bf16 weights) as bf16 math does."""
    import transformers as tf
    from conftest import hf_config
    from test_precision import _check_against

    from promptcache import LLM, SamplingParams

    cfg = hf_config("llama", hidden_size=128, head_dim=32)  # 4 heads, 2 KV heads
    torch.manual_seed(11)
    tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(tmp_path)
    from conftest import TOKENIZER_DIR

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((TOKENIZER_DIR / name).read_bytes())
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(10, 4000, (100,), generator=g).tolist()
    prompts = [torch.randint(10, 4000, (150,), generator=g).tolist()]
    prompts += [shared + torch.randint(10, 4000, (20,), generator=g).tolist() for _ in range(3)]
    monkeypatch.setenv("PROMPTCACHE_CPU_KERNELS", "native")
    llm = LLM(str(tmp_path), dtype="bfloat16", compute_dtype="bfloat16", num_blocks=128, max_num_batched_tokens=64,
              enable_prefix_caching=cache)
    assert llm.engine.runner.attention.name == "cpu-native"
    from promptcache.model.transformer import MLP, Attention, RMSNorm

    modules = list(llm.engine.runner.loaded.model.modules())
    assert all(m.native is not None for m in modules if isinstance(m, RMSNorm))  # one-pass row-wise ops
    assert all(m.silu_mul is not None for m in modules if isinstance(m, MLP))
    assert all(m.native is not None for m in modules if isinstance(m, Attention))  # RoPE in one pass
    lib = native.library()
    assert lib is not None
    calls = {"causal": 0, "cached": 0, "tails": 0}
    flash = lib.flash

    def counted(q, k, v, scale, causal, num_threads=None, kv_lens=None, kv_idx=None):
        res = flash(q, k, v, scale, causal, num_threads, kv_lens, kv_idx)
        calls["causal" if causal else "cached" if kv_lens is None else "tails"] += res is not None
        return res

    monkeypatch.setattr(lib, "flash", counted)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=5)
    outs = llm.generate(prompts, params)
    assert calls["causal"] > 0, calls
    assert calls["cached"] > 0, calls  # fresh chunks, and chunks / decodes over cached keys
    assert calls["tails"] > 0, calls  # the decodes' own recent keys, by lengths, read from their slots
    assert [o.usage.cached_tokens for o in outs] == ([0, 0, 96, 96] if cache else [0] * 4)
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                 min_new_tokens=8, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        lps = [torch.log_softmax(lg[0].float(), -1) for lg in ref.logits]
        _check_against(out, ref.sequences[0, len(prompt):].tolist(), lambda i, t, lps=lps: lps[i][t].item(), 8e-2)


@pytest.mark.parametrize("kwargs", [{"dtype": "float32"}, {"dtype": "bfloat16", "deterministic": True}],
                         ids=["float32", "deterministic"])
def test_other_policies_keep_pytorchs_ops(monkeypatch, kwargs):
    """float32 compute and deterministic mode (batch-invariant ops of its own) never use the bf16
    kernels; float32 runs the float32 library's (tests/test_native_f32.py) where the CPU has AVX2,
    deterministic mode PyTorch's ops and its own attention. (Any machine: this is policy.)"""
    from promptcache import LLM
    from promptcache.model.transformer import MLP, Attention, RMSNorm

    monkeypatch.setenv("PROMPTCACHE_CPU_KERNELS", "native")
    llm = LLM("random:tiny", num_blocks=16, **kwargs)
    modules = list(llm.engine.runner.loaded.model.modules())
    deterministic = "deterministic" in kwargs
    float32 = not deterministic and native.can_run(spec=native.F32)  # the float32 kernels run here
    lib = native.library_f32() if float32 else None
    assert all(m.native is lib for m in modules if isinstance(m, RMSNorm | Attention))
    assert all(m.silu_mul is lib for m in modules if isinstance(m, MLP))
    expected = "deterministic" if deterministic else "cpu-native" if float32 else "cpu-cascade"
    assert llm.engine.runner.attention.name == expected


@runs_here
@pytest.mark.parametrize("rows,width", [(1, 64), (7, 100), (300, 576), (33, 1537)])
def test_row_ops_round_like_pytorchs_composites(rows, width):
    """RMSNorm, RoPE and SiLU-and-multiply in one pass round where PyTorch's composites round: the
    same bits but for a float32 sum's order (one bf16 step at most, on a few values)."""
    import torch.nn.functional as F

    lib = native.library()
    assert lib is not None
    g = torch.Generator().manual_seed(rows * width)
    wide = (torch.randn(rows, width + 8, generator=g) * 3).bfloat16()
    x = wide[:, 3 : 3 + width]  # rows of a stride other than the width
    w = torch.randn(width, generator=g).bfloat16()
    ours = lib.rms_norm(x, w, 1e-5)
    theirs = w * F.rms_norm(x.float(), (width,), eps=1e-5).to(torch.bfloat16)
    assert ours.shape == x.shape and ours.dtype == torch.bfloat16
    assert (ours == theirs).float().mean().item() > 0.999
    assert torch.allclose(ours.float(), theirs.float(), rtol=2**-7, atol=1e-6)
    delta = (torch.randn(rows, width, generator=g) * 2).bfloat16()
    total, normed = lib.add_rms_norm(x, delta, w, 1e-5)  # the residual add fused into the next norm
    assert torch.equal(total, x + delta)
    theirs = w * F.rms_norm((x + delta).float(), (width,), eps=1e-5).to(torch.bfloat16)
    assert (normed == theirs).float().mean().item() > 0.999
    assert torch.allclose(normed.float(), theirs.float(), rtol=2**-7, atol=1e-6)
    # RoPE over q|k columns of a wider row (heads of a projection's output), positions' tables
    from promptcache.model.transformer import rotate

    d = 2 * (width // 4) or 2
    heads = width // d
    angles = torch.rand(rows, d // 2, generator=g) * 100
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().unsqueeze(1).bfloat16(), emb.sin().unsqueeze(1).bfloat16()
    qk = wide[:, : heads * d].view(rows, heads, d)
    assert torch.equal(lib.rope(qk, cos, sin), rotate(qk, (cos, sin)))  # rounds after each op, as PyTorch
    gate_up = (torch.randn(rows, 2 * width, generator=g) * 4).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    ours = lib.silu_mul(gate_up)
    theirs = F.silu(gate) * up
    assert (ours == theirs).float().mean().item() > 0.999
    assert torch.allclose(ours.float(), theirs.float(), rtol=2**-7, atol=1e-6)
