"""The native float32 attention kernel (model/native.py, csrc/flash_f32.c: AVX2 + FMA) against
float64 attention, and in the engine. It runs on every x86-64 CPU with AVX2 (the AVX-512 ones too,
where ``PROMPTCACHE_CPU_KERNELS=native`` picks it); elsewhere the run tests skip.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch
from test_native_attention import SHAPES, _reference

from promptcache.model import native
from promptcache.model.backends import pick_backend
from promptcache.model.kernels import cpu_flash, native_flash
from promptcache.model.native_lib import pack_w16, unpack_w16

runs_here = pytest.mark.skipif(not native.can_run(spec=native.F32), reason="the float32 kernel needs AVX2 and FMA")
KV_DTYPES = [torch.float32, torch.bfloat16]  # float32 math over a float32 or a bf16 KV cache


def _lib() -> native.Library:
    lib = native.library_f32()
    assert lib is not None
    return lib


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 intrinsics")
def test_builds_with_the_machines_compiler(tmp_path):
    path = native.build(tmp_path, spec=native.F32)
    assert path.exists() and path.name.startswith("native_f32-")
    assert native.build(tmp_path, spec=native.F32) == path
    assert native.build(tmp_path) != path  # the bf16 library is a library of its own


@runs_here
@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [*SHAPES, (2, 2, 2, 5, 9, 16, False), (1, 3, 1, 30, 30, 16, True)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(shape, kv_dtype):
    b, h, kvh, m, n, d, causal = shape
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    q = torch.randn(b, h, m, d, generator=g)
    k, v = (torch.randn(b, kvh, n, d, generator=g).to(kv_dtype) for _ in range(2))
    res = _lib().flash(q, k, v, d**-0.5, causal)
    assert res is not None
    out, lse = res
    ref_out, ref_lse = _reference(q, k, v, d**-0.5, causal)
    assert out.dtype == torch.float32 and out.shape == q.shape and lse.shape == q.shape[:3]
    assert (out.double() - ref_out).abs().max().item() < 1e-5
    assert (lse.double() - ref_lse).abs().max().item() < 1e-5
    if kvh == h and causal == (m == n):  # and at least as close as PyTorch's own kernel, within float32 noise
        t_out, _ = cpu_flash(q, k.float(), v.float(), d**-0.5, None, causal)
        t_err = (t_out.double() - ref_out).abs().max().item()
        assert (out.double() - ref_out).abs().max().item() <= 4 * t_err + 1e-6


@runs_here
@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_reads_strided_views_in_place(kv_dtype):
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(2, 3, 500, 64, generator=g).to(kv_dtype)  # [k|v, kvh, slots, d]
    k, v = cache[0, :, 100:400].unsqueeze(0), cache[1, :, 100:400].unsqueeze(0)
    q = torch.randn(50, 9, 64, generator=g).transpose(0, 1).unsqueeze(0)  # [1, 9, 50, 64], strided
    res = _lib().flash(q, k, v, 0.125, False)
    assert res is not None
    ref_out, ref_lse = _reference(q, k, v, 0.125, False)
    assert (res[0].double() - ref_out).abs().max().item() < 1e-5
    assert (res[1].double() - ref_lse).abs().max().item() < 1e-5


@runs_here
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_sequences_of_their_own_lengths(threads, kv_dtype):
    """``kv_lens``: what lies past each sequence's keys (NaN here) is never read."""
    g = torch.Generator().manual_seed(4)
    lens = [5, 70, 1, 64, 300, 1100]  # the last one long enough for key splits
    n = max(lens)
    q = torch.randn(len(lens), 3, 3, 64, generator=g)
    k, v = (torch.randn(len(lens), 3, n, 64, generator=g).to(kv_dtype) for _ in range(2))
    for b, length in enumerate(lens):
        k[b, :, length:] = v[b, :, length:] = float("nan")
    res = _lib().flash(q, k, v, 0.125, False, threads, kv_lens=torch.tensor(lens))
    assert res is not None
    for b, length in enumerate(lens):
        ref_out, ref_lse = _reference(q[b : b + 1], k[b : b + 1, :, :length], v[b : b + 1, :, :length], 0.125, False)
        assert (res[0][b].double() - ref_out[0]).abs().max().item() < 1e-5
        assert (res[1][b].double() - ref_lse[0]).abs().max().item() < 1e-5


@runs_here
@pytest.mark.parametrize("rows", [3, 40], ids=["decode-like", "chunk-like"])  # packed per item / up front
@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_reads_keys_by_slot_from_a_paged_cache(kv_dtype, rows):
    g = torch.Generator().manual_seed(6)
    cache = torch.randn(2, 3, 1500, 64, generator=g).to(kv_dtype)
    lens = [9, 40, 1, 1200]
    idx = torch.zeros(len(lens), max(lens), dtype=torch.long)
    for b, length in enumerate(lens):
        idx[b, :length] = torch.randperm(1500, generator=g)[:length]
    q = torch.randn(len(lens), 3, rows, 64, generator=g)
    res = _lib().flash(q, cache[0], cache[1], 0.125, False, kv_lens=torch.tensor(lens), kv_idx=idx)
    assert res is not None
    for b, length in enumerate(lens):
        k, v = cache[0][:, idx[b, :length]].unsqueeze(0), cache[1][:, idx[b, :length]].unsqueeze(0)
        ref_out, ref_lse = _reference(q[b : b + 1], k, v, 0.125, False)
        assert (res[0][b].double() - ref_out[0]).abs().max().item() < 1e-5
        assert (res[1][b].double() - ref_lse[0]).abs().max().item() < 1e-5


GUARD_PAGE_PROBE = """
import ctypes, mmap, torch
from promptcache.model import native
n, d = 17, 64
mm = mmap.mmap(-1, 2 * 4096)
base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
assert libc.mprotect(base + 4096, 4096, 0) == 0  # the second page: no access
idx = torch.frombuffer(mm, dtype=torch.int64, count=n, offset=4096 - 8 * n).view(1, n)  # ends at the page
idx.copy_(torch.arange(n).view(1, n))
for dtype in (torch.float32, torch.bfloat16):
    cache = torch.randn(1, 32, d).to(dtype)
    for rows in (1, 40):
        res = native.library_f32().flash(torch.randn(1, 1, rows, d), cache, cache, 0.125, False, kv_idx=idx)
        assert res is not None and torch.isfinite(res[1]).all()
"""


@runs_here
def test_slot_index_is_not_read_past_its_end():
    """Keys are padded to 16 inside the kernel; the slot index is read only for real keys (run
    apart: a crash is a failure here, not the end of the suite)."""
    res = subprocess.run([sys.executable, "-c", GUARD_PAGE_PROBE], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


@runs_here
def test_declines_what_it_does_not_take():
    lib = _lib()
    q = torch.randn(1, 2, 4, 24)  # head size not a multiple of 16
    assert lib.flash(q, q, q, 0.1, False) is None
    q = torch.randn(1, 2, 4, 64)
    assert lib.flash(q, q[..., ::2, :], q[..., ::2, :], 0.1, False) is not None
    assert lib.flash(q.transpose(-1, -2).contiguous().transpose(-1, -2), q, q, 0.1, False) is None  # d strided
    # what it declines, native_flash hands to PyTorch's kernel, with the same meaning
    q = torch.randn(1, 2, 4, 24)
    out, lse = native_flash(q, q, q, 0.1)
    ref_out, ref_lse = _reference(q, q, q, 0.1, False)
    assert (out.double() - ref_out).abs().max().item() < 1e-5


def test_mode_switch(monkeypatch):
    can = native.can_run(spec=native.F32)
    monkeypatch.setenv("PROMPTCACHE_CPU_KERNELS", "auto")
    assert native.native_f32(flags={"avx2", "fma"}) == can
    assert not native.native_f32(flags={"avx2", "fma", "avx512f"})  # PyTorch's AVX-512 kernel there
    monkeypatch.setenv("PROMPTCACHE_CPU_KERNELS", "native")
    assert native.native_f32(flags={"avx2", "fma", "avx512f"}) == can
    assert pick_backend(torch.device("cpu"), False, torch.float32).name == ("cpu-native" if can else "cpu-cascade")
    assert pick_backend(torch.device("cpu"), False, torch.float32, 64).name == ("cpu-native" if can else "cpu-cascade")
    # a head size the kernel declines (a multiple of 8, not 16; past 256): PyTorch's kernel and its plan,
    # not our backend falling back on every call (its by-slot plans would pad long tails into the fallback)
    assert pick_backend(torch.device("cpu"), False, torch.float32, 24).name == "cpu-cascade"
    assert pick_backend(torch.device("cpu"), False, torch.float32, 288).name == "cpu-cascade"
    assert pick_backend(torch.device("cpu"), True, torch.float32).name == "deterministic"  # its own ops
    monkeypatch.setenv("PROMPTCACHE_CPU_KERNELS", "torch")
    assert not native.native_f32()
    assert pick_backend(torch.device("cpu"), False, torch.float32).name == "cpu-cascade"


@runs_here
@pytest.mark.parametrize("kv_cache_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cache", [True, False], ids=["cache-on", "cache-off"])
def test_engine_runs_it_and_agrees_with_transformers(tmp_path, monkeypatch, cache, kv_cache_dtype):
    """The float32 policy (bf16 weights, float32 math: an AVX2 CPU's default) forced onto the kernels,
    head size 32, grouped heads: chunked prefill, cascade decode over a cached prefix and batched
    decode call the flash kernel, the layers the row-wise ops, and greedy tokens and logprobs agree
    with transformers in float32."""
    import transformers as tf
    from conftest import TOKENIZER_DIR, hf_config
    from test_precision import _check_against

    from promptcache import LLM, SamplingParams

    cfg = hf_config("llama", hidden_size=128, head_dim=32)  # 4 heads, 2 KV heads
    torch.manual_seed(11)
    tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((TOKENIZER_DIR / name).read_bytes())
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(10, 4000, (100,), generator=g).tolist()
    prompts = [torch.randint(10, 4000, (150,), generator=g).tolist()]
    prompts += [shared + torch.randint(10, 4000, (20,), generator=g).tolist() for _ in range(3)]
    monkeypatch.setenv("PROMPTCACHE_CPU_KERNELS", "native")
    llm = LLM(str(tmp_path), dtype="bfloat16", compute_dtype="float32", kv_cache_dtype=kv_cache_dtype,
              num_blocks=128, max_num_batched_tokens=64, enable_prefix_caching=cache)
    assert llm.engine.runner.attention.name == "cpu-native"
    from promptcache.model.transformer import MLP, Attention, RMSNorm

    modules = list(llm.engine.runner.loaded.model.modules())  # RMSNorm, RoPE, gated SiLU in one pass each
    assert all(m.native is not None for m in modules if isinstance(m, RMSNorm | Attention))
    assert all(m.silu_mul is not None for m in modules if isinstance(m, MLP))
    lib = _lib()
    calls = {"causal": 0, "whole": 0, "cached": 0, "tails": 0}
    flash = lib.flash

    def counted(q, k, v, scale, causal, num_threads=None, kv_lens=None, kv_idx=None):
        # keys read by slot come from the cache as stored; fresh ones (cold chunks) as float32 rounded alike
        fresh = causal and kv_idx is None
        assert q.dtype == torch.float32 and k.dtype == (torch.float32 if fresh else getattr(torch, kv_cache_dtype))
        res = flash(q, k, v, scale, causal, num_threads, kv_lens, kv_idx)
        kind = "causal" if fresh else "whole" if causal else "cached" if kv_lens is None else "tails"
        calls[kind] += res is not None
        return res

    monkeypatch.setattr(lib, "flash", counted)
    # every linear multiplies by its bf16 values (panels; no float32 copy), prefill chunks and decode steps
    from promptcache.model.transformer import Linear

    linears = [m for m in modules if isinstance(m, Linear)]
    assert linears and all(m.w16 is not None and m.w16_lib is lib and m.packed is None for m in linears)
    linear_w16 = lib.linear_w16

    def counted_w16(x, panels, n, bias):
        calls["w16"] = calls.get("w16", 0) + 1
        return linear_w16(x, panels, n, bias)

    monkeypatch.setattr(lib, "linear_w16", counted_w16)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=5)
    outs = llm.generate(prompts, params)
    # cold chunks, later chunks of the 150-token prompt and warm prompts (whole: one causal call over
    # their slots), decode tails, and with the cache on decodes of the three sharing a prefix (a group call)
    assert calls["causal"] > 0 and calls["tails"] > 0 and calls["whole"] > 0, calls
    assert (calls["cached"] > 0) == cache, calls
    assert calls["w16"] >= 7 * len(linears), calls  # every linear in each of the 7 decode steps at least
    assert [o.usage.cached_tokens for o in outs] == ([0, 0, 96, 96] if cache else [0] * 4)
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tol = 1e-3 if kv_cache_dtype == "float32" else 5e-2  # a bf16 cache rounds K/V
    for prompt, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                 min_new_tokens=8, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        lps = [torch.log_softmax(lg[0].float(), -1) for lg in ref.logits]
        _check_against(out, ref.sequences[0, len(prompt):].tolist(), lambda i, t, lps=lps: lps[i][t].item(), tol)


@runs_here
@pytest.mark.parametrize("m,n,k", [(1, 13, 8), (2, 64, 576), (3, 5, 24), (4, 100, 1536), (7, 257, 64), (8, 3, 16),
                                   (23, 16, 7), (24, 17, 100), (30, 40, 576), (200, 33, 64), (385, 20, 40)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_on_bf16_weights(m, n, k, bias):
    """``linear_w16``: float32 x times a bf16 weight (its values exactly, in ``pack_w16``'s panels)
    against float64: tiles of 1-6 rows, panels of 16 outputs and their remainders (N not a multiple of
    16, of 8), any K, passes of 192 rows and the panel converted once for passes of 24 rows or more,
    rows of x strided, with and without a bias; each row's result the same bits as alone."""
    lib = _lib()
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k + 8, generator=g)[:, 4 : 4 + k]  # rows strided: k + 8 apart
    w16 = torch.randn(n, k, generator=g).to(torch.bfloat16)
    panels = pack_w16(w16)
    assert torch.equal(unpack_w16(panels, n), w16)
    b = torch.randn(n, generator=g) if bias else None
    out = lib.linear_w16(x, panels, n, b)
    ref = x.double() @ w16.double().T + (b.double() if b is not None else 0.0)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert (out.double() - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item()) * k**0.5
    for i in {0, m // 2, m - 1}:  # batch-invariant: row 0 sits in a converted tile from 24 rows on
        assert torch.equal(lib.linear_w16(x[i : i + 1], panels, n, b), out[i : i + 1])
    threads = torch.get_num_threads()
    try:  # panels split between threads (the tests run single-threaded): the same bits
        torch.set_num_threads(2)
        assert torch.equal(lib.linear_w16(x, panels, n, b), out)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="expected"):  # x wider than the weight: never read past either
        lib.linear_w16(torch.randn(2, 16), pack_w16(torch.randn(3, 8).to(torch.bfloat16)), 3, None)
    with pytest.raises(ValueError, match="expected"):  # panels of another N
        lib.linear_w16(torch.randn(2, 8), pack_w16(torch.randn(3, 8).to(torch.bfloat16)), 17, None)
    with pytest.raises(ValueError, match="bias"):
        lib.linear_w16(torch.randn(2, 8), pack_w16(torch.randn(3, 8).to(torch.bfloat16)), 3, torch.randn(4))


@runs_here
@pytest.mark.parametrize("rows,width", [(1, 64), (7, 100), (300, 576), (33, 1537)])
def test_row_ops_compute_what_pytorchs_composites_compute(rows, width):
    """RMSNorm (and the residual add before it), RoPE and SiLU-and-multiply in one pass, float32:
    RoPE bit-identical (no fused multiply-adds where PyTorch rounds), the others within a float32
    sum's order and exp's last bits."""
    import torch.nn.functional as F

    from promptcache.model.attention import write_kv
    from promptcache.model.transformer import rotate

    lib = _lib()
    g = torch.Generator().manual_seed(rows * width)
    wide = torch.randn(rows, width + 8, generator=g) * 3
    x = wide[:, 3 : 3 + width]  # rows of a stride other than the width
    w = torch.randn(width, generator=g)
    ours = lib.rms_norm(x, w, 1e-5)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    assert torch.allclose(ours, w * F.rms_norm(x, (width,), eps=1e-5), rtol=1e-5, atol=1e-6)
    delta = torch.randn(rows, width, generator=g)
    total, normed = lib.add_rms_norm(x, delta, w, 1e-5)
    assert torch.equal(total, x + delta)
    assert torch.allclose(normed, w * F.rms_norm(x + delta, (width,), eps=1e-5), rtol=1e-5, atol=1e-6)
    d = 2 * (width // 4) or 2
    heads = width // d
    angles = torch.rand(rows, d // 2, generator=g) * 100
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)
    qk = wide[:, : heads * d].view(rows, heads, d)
    assert torch.equal(lib.rope(qk, cos, sin), rotate(qk, (cos, sin)))
    gate_up = torch.randn(rows, 2 * width, generator=g) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.allclose(lib.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-6)
    ours_kv, theirs_kv = (torch.zeros(2, 3, 64, 32) for _ in range(2))
    qkv = torch.randn(10, 15, 32, generator=g)
    slots = torch.tensor([5, 6, 7, 40, 41, 63, 0, 1, 2, 3])
    lib.write_kv(ours_kv, qkv[:, 9:12], qkv[:, 12:], slots)
    write_kv(theirs_kv, qkv[:, 9:12], qkv[:, 12:], slots)
    assert torch.equal(ours_kv, theirs_kv)


@runs_here
def test_a_long_context_takes_scratch_of_its_own():
    """A decode-like call over a context whose packed keys pass the per-thread buffer kept between
    calls (16 MiB) packs into a buffer of its own, freed after (no thread keeps that size)."""
    g = torch.Generator().manual_seed(8)
    n, d = 8200, 256  # 8,208 keys x 256 dims x (K + converted V): 4.2 M floats per item
    q = torch.randn(8, 1, 1, d, generator=g)
    k, v = (torch.randn(8, 1, n, d, generator=g).bfloat16() for _ in range(2))
    res = _lib().flash(q, k, v, d**-0.5, False)
    assert res is not None
    ref_out, ref_lse = _reference(q, k, v, d**-0.5, False)
    assert (res[0].double() - ref_out).abs().max().item() < 1e-5
    assert (res[1].double() - ref_lse).abs().max().item() < 1e-5


@runs_here
def test_packed_keys_of_a_call_kept_grown_and_past_the_limit():
    """Calls that pack every head's K/V up front (several query blocks, or grouped heads) pack into a
    buffer the calling thread keeps: reused by a smaller call, grown for a larger one, and past 32 MiB
    a buffer of the call's own (2 x 2 x 8,208 keys x 256 dims: 8.4 M floats) — the kept one, still
    there, serves the calls after it. Each answer is the reference's."""
    g = torch.Generator().manual_seed(9)
    lib = _lib()
    for b, hq, m, n, d in [(1, 3, 40, 300, 64), (1, 2, 30, 100, 32), (2, 2, 1, 8200, 256), (1, 3, 40, 300, 64),
                           (2, 4, 50, 2000, 64)]:
        q = torch.randn(b, hq, m, d, generator=g)
        k, v = (torch.randn(b, 1, n, d, generator=g) for _ in range(2))
        res = lib.flash(q, k, v, d**-0.5, False)
        assert res is not None
        ref_out, ref_lse = _reference(q, k, v, d**-0.5, False)
        assert (res[0].double() - ref_out).abs().max().item() < 1e-5, (b, hq, m, n, d)
        assert (res[1].double() - ref_lse).abs().max().item() < 1e-5


@runs_here
@pytest.mark.parametrize("hq,hk,m,n,paged", [(4, 2, 3, 1500, False), (2, 2, 1, 900, True), (3, 1, 7, 2000, True)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_few_causal_queries_over_a_long_context_split_its_keys(hq, hk, m, n, paged, threads):
    """A short chunk attended whole over a long context (causal, few query blocks) splits its keys
    across threads like a decode does (``want`` 4 items per thread): splits past a query's last key
    give it nothing (lse -inf) and merge away. By slot or not, every thread count, the reference's."""
    g = torch.Generator().manual_seed(hq * 100 + m + n)
    q = torch.randn(1, hq, m, 64, generator=g)
    if paged:
        slots = 3 * n
        cache = torch.randn(2, hk, slots, 64, generator=g)
        idx = torch.randperm(slots, generator=g)[:n].view(1, n)
        res = _lib().flash(q, cache[0], cache[1], 0.125, True, num_threads=threads, kv_idx=idx)
        k, v = (cache[i][:, idx[0]].unsqueeze(0) for i in range(2))
    else:
        k, v = (torch.randn(1, hk, n, 64, generator=g) for _ in range(2))
        res = _lib().flash(q, k, v, 0.125, True, num_threads=threads)
    assert res is not None
    ref_out, ref_lse = _reference(q, k, v, 0.125, True)
    assert (res[0].double() - ref_out).abs().max().item() < 1e-5
    assert (res[1].double() - ref_lse).abs().max().item() < 1e-5


@runs_here
def test_kept_buffers_serve_threads_that_come_and_go():
    """Each calling thread keeps its own packed-K/V buffer (freed by a destructor when the thread
    ends): calls from threads that come and go beside a long-lived one (an engine stopped and started
    again) stay right — no thread's end frees what another still uses."""
    import threading

    lib = _lib()
    g = torch.Generator().manual_seed(12)
    q = torch.randn(1, 4, 30, 64, generator=g)
    k, v = (torch.randn(1, 2, 700, 64, generator=g) for _ in range(2))
    ref_out, _ = _reference(q, k, v, 0.125, False)
    errors: list[float] = []

    def work() -> None:
        for _ in range(3):
            res = lib.flash(q, k, v, 0.125, False)
            errors.append((res[0].double() - ref_out).abs().max().item() if res is not None else float("inf"))

    for _ in range(3):
        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        work()  # this thread's buffer, used beside theirs and after they end
        for t in threads:
            t.join()
    assert len(errors) == 27 and max(errors) < 1e-5


@runs_here
def test_wrapper_checks_what_the_kernels_would_read_past():
    lib = _lib()
    x = torch.randn(4, 16)
    with pytest.raises(AssertionError):
        lib.rms_norm(x, torch.randn(8), 1e-5)  # a weight shorter than the row
    with pytest.raises(AssertionError):
        lib.add_rms_norm(x, x, torch.randn(32)[::2], 1e-5)  # a strided weight
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(AssertionError):  # causal over per-sequence lengths: not a call anyone makes
        lib.flash(q, q, q, 0.25, True, kv_lens=torch.tensor([2]))
