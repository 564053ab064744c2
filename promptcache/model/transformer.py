"""Decoder-only transformers: the Llama family (Llama, Mistral, Qwen2, Qwen3) and GPT-2.

``forward(input_ids, positions, attn, kv_caches) -> hidden`` over a flat batch of tokens; the
attention metadata and the per-layer KV tensors come in as arguments. Projections are fused at
load time (q|k|v, gate|up) so each layer runs a few large matmuls instead of many small ones.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from promptcache.model.attention import AttentionMetadata, OutputRows
from promptcache.model.config import ArchConfig
from promptcache.model.deterministic import pointwise, tiled_linear, tiled_rows
from promptcache.model.native_lib import unpack_w16


class Linear(nn.Linear):
    """``nn.Linear`` that can run batch-invariant (fixed-shape row tiles, model/deterministic.py), or
    on a weight packed once (CPU, model/prepack.py): in oneDNN's own layout, or — float32 math on a
    bf16 checkpoint with our float32 kernels — as its bf16 values in panels that our library's
    ``linear_w16`` multiplies by (half the bytes, no float32 copy)."""

    row_tiled = False
    packed: torch.Tensor | None = None  # the weight in oneDNN's layout; the plain one is then freed
    w16: torch.Tensor | None = None  # or its bf16 values (exact) in native_lib.pack_w16's panels
    w16_lib: Any = None  # model/native.py's float32 Library that multiplies by them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_tiled:
            return tiled_linear(x, self.weight, self.bias)
        if self.w16 is not None:
            rows = x if x.dim() == 2 and x.stride(1) == 1 else x.reshape(-1, x.shape[-1]).contiguous()
            out = self.w16_lib.linear_w16(rows, self.w16, self.out_features, self.bias)
            return out if rows is x else out.view(*x.shape[:-1], self.out_features)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def plain_weight(self) -> torch.Tensor:
        """The weight as ``[out, in]`` values (unpacked: a copy when packed)."""
        if self.w16 is not None:
            return unpack_w16(self.w16, self.out_features).float()
        return self.packed.to_dense() if self.packed is not None else self.weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    row_tiled = False  # deterministic mode: fixed-shape row tiles (model/deterministic.py)
    native: Any = None  # model/native.py's Library: the same ops in one pass (bf16 or float32 CPU kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_tiled:
            return tiled_rows(self._norm, x)
        if self.native is not None:
            return self.native.rms_norm(x, self.weight, self.eps)
        return self._norm(x)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, this norm of it): one pass with the native ops; ``delta`` None: (x, norm(x))."""
        if delta is None:
            return x, self(x)
        if self.native is not None:
            return self.native.add_rms_norm(x, delta, self.weight, self.eps)
        x = x + delta
        return x, self(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Same order of operations as transformers: normalise in float32, scale in the input dtype.
        # F.rms_norm: the same bits as x * rsqrt(mean(x^2) + eps) (checked for bf16 / fp16 / fp32,
        # widths 64-5120, batch-invariant), in fewer passes (a 2,048-token prefill's elementwise
        # multiplies under the profiler: 272 calls / 135 ms -> 212 / 76 ms).
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    row_tiled = False  # deterministic mode: fixed-shape row tiles (model/deterministic.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_tiled:
            return tiled_rows(super().forward, x)
        return super().forward(x)


class Rotary(nn.Module):
    """Rotate-half RoPE with cos/sin tables precomputed for every position."""

    def __init__(self, cfg: ArchConfig, max_len: int) -> None:
        super().__init__()
        self.cfg, self.max_len = cfg, max_len
        self.cos = self.sin = torch.empty(0)

    def build(self, device: torch.device) -> None:
        """Tables in float32 on ``device``; called after weights load (the module starts on meta)."""
        inv_freq = torch.tensor(self.cfg.rope.inv_freq(self.cfg.head_dim), dtype=torch.float32)
        pos = torch.arange(self.max_len, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)  # [max_len, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_len, d]
        self.cos, self.sin = emb.cos().to(device), emb.sin().to(device)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the step's positions, ``[T, 1, d]``: looked up once per step, not per layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    # x: [T, heads, d]; rope: cos, sin [T, 1, d]
    cos, sin = rope
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _act(name: str):
    if name in ("silu", "swish"):
        return F.silu
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported activation {name!r}")


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim**-0.5
        self.native: Any = None  # model/native.py's Library: RoPE in one pass

    def _rotate(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.native.rope(x, *rope) if self.native is not None else rotate(x, rope)

    def forward(
        self,
        x: torch.Tensor,
        attn: AttentionMetadata,
        kv_cache: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        outputs: OutputRows | None = None,
    ) -> torch.Tensor:
        """``outputs``: store every row's K/V, attend for those rows only (``[R, hidden]`` back)."""
        num_tokens = x.shape[0]
        qkv = self.qkv(x)
        heads = self.num_heads + self.num_kv_heads
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = qkv[:, : self.q_size], qkv[:, self.q_size : self.q_size + self.kv_size]
            q = self.q_norm(q.view(num_tokens, self.num_heads, self.head_dim))
            k = self.k_norm(k.view(num_tokens, self.num_kv_heads, self.head_dim))
            if rope is not None:
                q, k = self._rotate(q, rope), self._rotate(k, rope)
        else:
            # q and k side by side, [T, H + kvh, d]: rotated in one pass (half the ops of two)
            qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, heads, self.head_dim)
            if rope is not None:
                qk = self._rotate(qk, rope)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        backend = attn.backend
        if backend is None:  # one choice, the runner's (model/backends.py): never a silent default
            raise ValueError("AttentionMetadata.backend is not set; the model runner picks the backend")
        if outputs is None:
            out = backend(q, k, v, kv_cache, attn, self.scale)  # [T, H, d]
            return self.o(out.reshape(num_tokens, self.q_size))
        rows = outputs.rows
        if outputs.attn is None:  # every row attends by the step's plan; the rows are kept after
            out = backend(q, k, v, kv_cache, attn, self.scale).index_select(0, rows)
        else:
            backend.write(kv_cache, k, v, attn.slot_mapping)
            if rows.numel() == 0:
                return x.new_empty(0, self.o.out_features)
            # the wanted rows' queries over their contexts (their K/V stored again: R rows)
            q, k, v = q.index_select(0, rows), k.index_select(0, rows), v.index_select(0, rows)
            out = backend(q, k, v, kv_cache, outputs.attn, self.scale)
        return self.o(out.reshape(rows.numel(), self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.gated = cfg.family == "llama"
        self.act = _act(cfg.hidden_act)
        up_out = 2 * cfg.intermediate_size if self.gated else cfg.intermediate_size
        self.up = Linear(cfg.hidden_size, up_out, bias=cfg.mlp_bias)  # gate|up when gated
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.deterministic = False
        self.silu_mul: Any = None  # model/native.py's Library (gated SiLU in one pass)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.silu_mul is not None:
            return self.down(self.silu_mul.silu_mul(h))
        act = (lambda t: pointwise(self.act, t)) if self.deterministic else self.act
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.down(act(gate) * up)
        return self.down(act(h))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        norm = (lambda: RMSNorm(cfg.hidden_size, cfg.norm_eps)) if cfg.family == "llama" else (
            lambda: LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        )
        self.attn_norm = norm()
        self.attn = Attention(cfg)
        self.mlp_norm = norm()
        self.mlp = MLP(cfg)

    def forward(self, x, attn, kv_cache, rope, outputs: OutputRows | None = None):
        """``outputs``: the last layer's (``OutputRows``): returns those rows only."""
        a = self.attn(self.attn_norm(x), attn, kv_cache, rope, outputs)
        if outputs is not None:
            if outputs.rows.numel() == 0:
                return a
            x = x.index_select(0, outputs.rows)
        x = x + a
        return x + self.mlp(self.mlp_norm(x))

    def forward_pair(self, residual: torch.Tensor, delta: torch.Tensor | None, attn: AttentionMetadata,
                     kv_cache: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                     outputs: OutputRows | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward`` with each residual add done by the norm after it (native RMSNorm: one pass):
        takes and returns the residual stream and the delta not yet added to it."""
        assert isinstance(self.attn_norm, RMSNorm) and isinstance(self.mlp_norm, RMSNorm)
        residual, h = self.attn_norm.add_norm(residual, delta)
        a = self.attn(h, attn, kv_cache, rope, outputs)
        if outputs is not None:
            if outputs.rows.numel() == 0:
                return a, None
            residual = residual.index_select(0, outputs.rows)
        residual, h = self.mlp_norm.add_norm(residual, a)
        return residual, self.mlp(h)


class CausalLM(nn.Module):
    """A decoder-only LM over a flat token batch with paged KV storage."""

    def __init__(self, cfg: ArchConfig, max_model_len: int | None = None, deterministic: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embed = (
            nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size) if cfg.family == "gpt2" else None
        )
        self.rotary = Rotary(cfg, self.max_model_len) if cfg.family == "llama" else None
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = (
            RMSNorm(cfg.hidden_size, cfg.norm_eps)
            if cfg.family == "llama"
            else LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        )
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        # batch-invariant linears and pointwise ops (attention: the runner's deterministic backend)
        if deterministic:
            for module in self.modules():
                if isinstance(module, Linear | RMSNorm | LayerNorm):
                    module.row_tiled = True
                elif isinstance(module, MLP):
                    module.deterministic = True

    def use_native_ops(self, lib: Any) -> None:
        """RMSNorm, RoPE and gated SiLU through ``lib`` (model/native.py: its dtype is the compute
        dtype, bf16 or float32, on a CPU, not deterministic mode): one pass each instead of PyTorch's
        three to six."""
        for module in self.modules():
            if isinstance(module, RMSNorm) and module.weight.dtype == lib.dtype:
                module.native = lib
            elif isinstance(module, MLP) and module.gated and self.cfg.hidden_act in ("silu", "swish"):
                module.silu_mul = lib
            elif isinstance(module, Attention) and self.rotary is not None:
                module.native = lib

    def finish_loading(self, device: torch.device) -> None:
        if self.cfg.tie_word_embeddings:  # to_empty() unties shared parameters; tie them again
            self.lm_head.weight = self.embed.weight
        if self.rotary is not None:
            self.rotary.build(device)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden: [T, hidden], or [R, hidden] for ``attn.outputs``' rows
        x = self.embed(input_ids).to(self.norm.weight.dtype)  # a 16-bit table (model/prepack.py): exact upcast
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        rope = self.rotary.tables(positions, x.dtype) if self.rotary is not None else None
        last = len(self.layers) - 1
        if isinstance(self.norm, RMSNorm) and self.norm.native is not None:  # residual adds fused into the norms
            delta: torch.Tensor | None = None
            for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
                assert isinstance(layer, DecoderLayer)
                x, delta = layer.forward_pair(x, delta, attn, kv_cache, rope, attn.outputs if i == last else None)
            return self.norm.add_norm(x, delta)[1] if x.shape[0] else x
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            x = layer(x, attn, kv_cache, rope, attn.outputs if i == last else None)
        return self.norm(x) if x.shape[0] else x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] -> logits [N, vocab] in float32 (sampling and logprobs want full precision)
        return self.lm_head(hidden).float()
