"""Architecture description parsed from a Hugging Face ``config.json``.

One frozen dataclass covers every supported family; the differences between families are
flags (bias on q/k/v, q/k RMSNorm, learned positions) rather than subclasses, so the model code
reads as one path with a few branches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# model_type in config.json -> our family name
FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gpt2": "gpt2",
}


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3 | dynamic(treated as default below its limit)
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, head_dim: int) -> list[float]:
        """Per-pair inverse frequencies, with the scaling rule applied (as transformers does)."""
        base = [1.0 / (self.theta ** (i / head_dim)) for i in range(0, head_dim, 2)]
        if self.kind == "linear":
            return [f / self.factor for f in base]
        if self.kind != "llama3":
            return base
        # Llama 3.1+: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
        low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        out = []
        for f in base:
            wavelen = 2 * math.pi / f
            if wavelen < high_wavelen:
                out.append(f)
            elif wavelen > low_wavelen:
                out.append(f / self.factor)
            else:
                smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
                    self.high_freq_factor - self.low_freq_factor
                )
                out.append((1 - smooth) * f / self.factor + smooth * f)
        return out


@dataclass(frozen=True)
class ArchConfig:
    family: str  # "llama" (Llama, Mistral, Qwen2, Qwen3) or "gpt2"
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    rope: RopeConfig = field(default_factory=RopeConfig)

    @property
    def kv_elements_per_token(self) -> int:
        """Elements of K and V per token across all layers (times the dtype size: bytes)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @property
    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        mlp = (3 if self.family == "llama" else 2) * h * i
        per_layer = h * q + 2 * h * kv + q * h + mlp
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb


def _rope_from(cfg: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; hub checkpoints written earlier carry
    # `rope_theta` + `rope_scaling`. Accept both.
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = str(params.get("rope_type", params.get("type", "default")))
    if kind not in ("default", "linear", "llama3", "dynamic"):
        raise ValueError(f"unsupported rope_type {kind!r}; supported: default, linear, llama3")
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def arch_from_hf_config(cfg: dict[str, Any]) -> ArchConfig:
    model_type = cfg.get("model_type", "")
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    if FAMILIES[model_type] == "gpt2":
        hidden = int(cfg["n_embd"])
        heads = int(cfg["n_head"])
        return ArchConfig(
            family="gpt2",
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(cfg["n_layer"]),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            intermediate_size=int(cfg.get("n_inner") or 4 * hidden),
            max_position_embeddings=int(cfg.get("n_positions", 1024)),
            norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            hidden_act=str(cfg.get("activation_function", "gelu_new")),
        )
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or hidden // heads
    qkv_bias = bool(cfg.get("attention_bias", False)) or model_type == "qwen2"
    return ArchConfig(
        family="llama",
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        intermediate_size=int(cfg["intermediate_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=bool(cfg.get("attention_bias", False)) and model_type != "qwen2",
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        hidden_act=str(cfg.get("hidden_act", "silu")),
        rope=_rope_from(cfg),
    )
