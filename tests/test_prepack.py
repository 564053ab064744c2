"""Linear weights packed into oneDNN's layout at load (model/prepack.py): the same logits as the
plain ``F.linear`` path, every linear packed, the plain copies freed (a tied head keeps the embedding's
table), values recoverable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from promptcache.engine.precision import cpu_has_native_bf16
from promptcache.model import loader, native
from promptcache.model.attention import AttentionMetadata
from promptcache.model.backends import pick_backend
from promptcache.model.loader import load_model
from promptcache.model.prepack import prepack_linears
from promptcache.model.shapes import random_checkpoint
from promptcache.model.transformer import Linear

DTYPES = [torch.float32] + ([torch.bfloat16] if cpu_has_native_bf16() else [])


def _logits(model, arch, dtype: torch.dtype, ids: list[int]) -> torch.Tensor:
    """A plain prefill of ``ids`` through the model's own forward; the last position's logits."""
    n = len(ids)
    backend = pick_backend(torch.device("cpu"), deterministic=False)
    attn = AttentionMetadata(torch.arange(n), [0, n], [n], [[(0, n)]], num_kv_heads=arch.num_kv_heads,
                             backend=backend)
    backend.prepare(attn, arch.num_heads, dtype, torch.device("cpu"))
    kv = [torch.zeros(2, arch.num_kv_heads, n, arch.head_dim, dtype=dtype) for _ in range(arch.num_layers)]
    hidden = model(torch.tensor(ids), torch.arange(n), attn, kv)
    return model.compute_logits(hidden[-1:])


def _untied(tmp_path: Path) -> Path:
    """The tiny checkpoint with an lm_head of its own (not tied to the embedding)."""
    src = random_checkpoint("tiny")
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"]) * 0.02
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_packed_linears_match_plain(tmp_path, tie, dtype):
    path = random_checkpoint("tiny") if tie else _untied(tmp_path)
    plain = load_model(path, dtype, torch.device("cpu"), 256, prepack=False)
    packed = load_model(path, dtype, torch.device("cpu"), 256)
    linears = [m for m in packed.model.modules() if isinstance(m, Linear)]
    tied = packed.model.lm_head.weight is packed.model.embed.weight
    assert tied == tie
    # every linear is packed; the plain copies are freed but a tied head's (the embedding's table)
    assert all(m.packed is not None for m in linears)
    assert [m.weight.numel() == 0 for m in linears] == [not (tied and m is packed.model.lm_head) for m in linears]
    assert torch.equal(packed.model.embed.weight, plain.model.embed.weight)
    plain_linears = [m for m in plain.model.modules() if isinstance(m, Linear)]
    assert all(m.packed is None for m in plain_linears)
    for a, b in zip(linears, plain_linears, strict=True):
        assert torch.equal(a.plain_weight(), b.weight)
    ids = list(range(10, 80))
    got, want = _logits(packed.model, packed.arch, dtype, ids), _logits(plain.model, plain.arch, dtype, ids)
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)  # the same oneDNN kernels, without the per-call reorder
    else:
        assert (got - want).abs().max().item() < 1e-4


def test_tied_table_kept_in_its_values_dtype(monkeypatch):
    """float32 compute on bf16 values (a CPU without native bf16): the tied embedding table is stored
    in bf16 once its head has a packed copy (half the copy's memory), and lookups upcast it exactly.
    PyTorch's kernels here: with ours the linears keep bf16 panels instead (next test)."""
    monkeypatch.setenv("PROMPTCACHE_CPU_KERNELS", "torch")
    path = random_checkpoint("tiny")
    plain = load_model(path, torch.float32, torch.device("cpu"), 256, value_dtype=torch.bfloat16, prepack=False)
    packed = load_model(path, torch.float32, torch.device("cpu"), 256, value_dtype=torch.bfloat16)
    embed = packed.model.embed.weight
    assert embed.dtype == torch.bfloat16 and plain.model.embed.weight.dtype == torch.float32
    assert packed.model.lm_head.weight is embed and packed.model.lm_head.packed is not None
    assert torch.equal(embed.float(), plain.model.embed.weight)
    assert torch.equal(packed.model.lm_head.plain_weight(), plain.model.lm_head.weight)
    ids = list(range(10, 80))
    got = _logits(packed.model, packed.arch, torch.float32, ids)
    want = _logits(plain.model, plain.arch, torch.float32, ids)
    assert got.dtype == torch.float32 and (got - want).abs().max().item() < 1e-4
    # float32 values (no 16-bit dtype asked for) stay float32
    full = load_model(path, torch.float32, torch.device("cpu"), 256)
    assert full.model.embed.weight.dtype == torch.float32 and full.model.lm_head.packed is not None


def test_deterministic_mode_keeps_plain_tiled_linears():
    loaded = load_model(random_checkpoint("tiny"), torch.float32, torch.device("cpu"), 256, deterministic=True)
    assert all(m.packed is None and m.row_tiled for m in loaded.model.modules() if isinstance(m, Linear))


@pytest.mark.skipif(not native.can_run(spec=native.F32), reason="the float32 kernels need AVX2 and FMA")
def test_float32_math_on_bf16_values_keeps_only_bf16_panels(monkeypatch):
    """float32 math on bf16 values with our float32 kernels: each linear keeps only its bf16 values,
    in ``linear_w16``'s panels (no float32 copy, no oneDNN packing; a tied head keeps the embedding's
    bf16 table for lookups beside its panels), every row count multiplies by them, and the logits
    match the plain float32 path's but for a float32 sum's order. A row's output does not depend on
    the rows beside it (one chain of fused multiply-adds per output, whatever the tiling). Without
    our kernels, or on float32 values, no panels."""
    monkeypatch.setenv("PROMPTCACHE_CPU_KERNELS", "native")
    path = random_checkpoint("tiny")
    plain = load_model(path, torch.float32, torch.device("cpu"), 256, value_dtype=torch.bfloat16, prepack=False)
    arrived = []

    def seen(model, **kw):  # the weights as loaded, before packing: the linears in bf16 already
        arrived.extend((m is model.lm_head, m.weight.dtype) for m in model.modules() if isinstance(m, Linear))
        return prepack_linears(model, **kw)

    monkeypatch.setattr(loader, "prepack_linears", seen)
    loaded = load_model(path, torch.float32, torch.device("cpu"), 256, value_dtype=torch.bfloat16)
    # no float32 copy ever made; the tied head is the embedding's table (float32 until packing narrows it)
    assert arrived and all(dtype == (torch.float32 if head else torch.bfloat16) for head, dtype in arrived)
    lib = native.library_f32()
    linears = [m for m in loaded.model.modules() if isinstance(m, Linear)]
    assert linears and all(m.w16 is not None and m.w16_lib is lib and m.packed is None for m in linears)
    assert [m.weight.numel() == 0 for m in linears] == [m is not loaded.model.lm_head for m in linears]
    embed = loaded.model.embed.weight
    assert embed.dtype == torch.bfloat16 and loaded.model.lm_head.weight is embed
    for a, b in zip(linears, (m for m in plain.model.modules() if isinstance(m, Linear)), strict=True):
        assert a.w16.dtype == torch.bfloat16 and torch.equal(a.plain_weight(), b.weight)
    g = torch.Generator().manual_seed(3)
    calls = []
    linear_w16 = lib.linear_w16

    def counted(x, panels, n, bias):
        calls.append(x.shape[0])
        return linear_w16(x, panels, n, bias)

    monkeypatch.setattr(lib, "linear_w16", counted)
    for m in linears:
        x = torch.randn(3, m.in_features, generator=g)
        few = m(x)
        # batch-invariant: first in a 203-row call (a tile of a converted panel), last (past a 192-row pass)
        many = m(torch.cat([x, torch.randn(200, m.in_features, generator=g), x]))
        assert torch.equal(few, many[:3]) and torch.equal(few, many[-3:])
        want = F.linear(x.double(), m.plain_weight().double(), None if m.bias is None else m.bias.double())
        assert (few.double() - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item()) * m.in_features**0.5
        assert few.shape == (3, m.out_features) and m(x.view(1, 3, -1)).shape == (1, 3, m.out_features)
    assert calls[:2] == [3, 206] and len(calls) == 3 * len(linears)
    ids = list(range(10, 80))
    got = _logits(loaded.model, loaded.arch, torch.float32, ids)
    want = _logits(plain.model, plain.arch, torch.float32, ids)
    assert (got - want).abs().max().item() < 1e-4
    assert not any(m.w16 is not None for m in load_model(path, torch.float32, torch.device("cpu"), 256).model.modules()
                   if isinstance(m, Linear))  # float32 values
    monkeypatch.setenv("PROMPTCACHE_CPU_KERNELS", "torch")
    off = load_model(path, torch.float32, torch.device("cpu"), 256, value_dtype=torch.bfloat16)
    assert not any(m.w16 is not None for m in off.model.modules() if isinstance(m, Linear))
