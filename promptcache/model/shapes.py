"""Random-weight checkpoints with the shapes of real models (see shared/BENCHMARKS.md).

Speed does not depend on weight values, so benchmarks and tests run on deterministic random
weights written as a real Hugging Face checkpoint directory (config.json, model.safetensors,
tokenizer files, generation_config.json). transformers, vLLM and llama.cpp's converter load the
same directory, so every engine is measured on identical weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from promptcache.home import cache_root

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOKENIZER_DIR = ASSETS / "tokenizer"
DEFAULT_MODEL_DIR = ASSETS / "default-model"
TOKENIZER_VOCAB = 4096  # the shipped byte-level BPE; every shape's vocab is at least this

_LLAMA_BASE: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
}

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        **_LLAMA_BASE,
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 256,
        "vocab_size": TOKENIZER_VOCAB,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        # wider than real init so random logits are well separated (bf16 vs fp32 greedy agree)
        "initializer_range": 0.1,
    },
    "demo": {  # the embedded default model
        **_LLAMA_BASE,
        "num_hidden_layers": 6,
        "hidden_size": 256,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "intermediate_size": 768,
        "vocab_size": TOKENIZER_VOCAB,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    },
    "smollm2-135m": {
        **_LLAMA_BASE,
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
    },
    "qwen2.5-0.5b": {
        **_LLAMA_BASE,
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "num_hidden_layers": 24,
        "hidden_size": 896,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
    },
    "llama-3.2-1b": {
        **_LLAMA_BASE,
        "num_hidden_layers": 16,
        "hidden_size": 2048,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "intermediate_size": 8192,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": True,
    },
}


def _hf_tensors(cfg: dict[str, Any], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Weights under transformers' names for the Llama / Qwen2 layout, seeded and reproducible."""
    gen = torch.Generator().manual_seed(seed)
    std = float(cfg.get("initializer_range", 0.02))
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or h // heads
    bias = cfg["model_type"] == "qwen2"

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).mul_(std).to(dtype)

    out = {"model.embed_tokens.weight": normal(vocab, h), "model.norm.weight": torch.ones(h, dtype=dtype)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = normal(heads * head_dim, h)
        out[p + "self_attn.k_proj.weight"] = normal(kv_heads * head_dim, h)
        out[p + "self_attn.v_proj.weight"] = normal(kv_heads * head_dim, h)
        out[p + "self_attn.o_proj.weight"] = normal(h, heads * head_dim)
        if bias:
            out[p + "self_attn.q_proj.bias"] = normal(heads * head_dim)
            out[p + "self_attn.k_proj.bias"] = normal(kv_heads * head_dim)
            out[p + "self_attn.v_proj.bias"] = normal(kv_heads * head_dim)
        out[p + "mlp.gate_proj.weight"] = normal(inter, h)
        out[p + "mlp.up_proj.weight"] = normal(inter, h)
        out[p + "mlp.down_proj.weight"] = normal(h, inter)
        out[p + "input_layernorm.weight"] = torch.ones(h, dtype=dtype)
        out[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
    if not cfg.get("tie_word_embeddings", False):
        out["lm_head.weight"] = normal(vocab, h)
    return out


def _token_ids() -> dict[str, int]:
    vocab = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    return {t["content"]: t["id"] for t in vocab["added_tokens"]}


def write_checkpoint(
    shape: str, out: str | Path, dtype: str = "bfloat16", seed: int = 0, tensors: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write a checkpoint of ``shape`` into directory ``out`` and return it: random weights from
    ``seed``, or ``tensors`` (transformers' names, e.g. a trained model's state dict)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    special = _token_ids()
    cfg = {
        **SHAPES[shape],
        "bos_token_id": special["<|endoftext|>"],
        "eos_token_id": special["<|im_end|>"],
        "torch_dtype": dtype,
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen_cfg = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": [special["<|im_end|>"], special["<|endoftext|>"]]}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER_DIR / name, out / name)
    if tensors is None:
        tensors = _hf_tensors(cfg, seed, torch_dtype)
    else:
        tensors = {k: v.detach().to(torch_dtype).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def random_checkpoint(shape: str, seed: int = 0) -> Path:
    """The directory of ``random:<shape>``, written once and reused (atomic rename, safe in parallel)."""
    dtype = "float32" if shape == "tiny" else "bfloat16"
    target = cache_root() / "random" / f"{shape}-seed{seed}-{dtype}"
    if (target / "model.safetensors").exists():
        _refresh_tokenizer(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{shape}-"))
    write_checkpoint(shape, tmp, dtype=dtype, seed=seed)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _refresh_tokenizer(target: Path) -> None:
    """A checkpoint written by an older version keeps its weights but takes the shipped tokenizer
    files (the chat template gained tool support once; a stale copy would render without it)."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shipped = (TOKENIZER_DIR / name).read_bytes()
        path = target / name
        if not path.exists() or path.read_bytes() != shipped:
            tmp = path.with_name(f".{name}.{os.getpid()}")
            tmp.write_bytes(shipped)
            os.replace(tmp, path)
