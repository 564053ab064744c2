"""Shared fixtures: real Hugging Face checkpoints with random weights, written into temp dirs."""

from __future__ import annotations

import os

# Test models are tiny: one thread avoids OpenMP barrier stalls (tens of ms per op when the two
# cores are shared with anything else) and keeps timing-free tests fast and steady.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil
from pathlib import Path

import pytest
import torch

from promptcache.model.shapes import TOKENIZER_DIR, TOKENIZER_VOCAB


def hf_config(family: str, **overrides):
    """A small transformers config of ``family`` (vocab covers the shipped tokenizer)."""
    import transformers as tf

    common = dict(vocab_size=TOKENIZER_VOCAB, initializer_range=0.1)
    llama_like = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        **common,
    )
    if family == "llama":
        cfg = tf.LlamaConfig(
            **llama_like,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        )
    elif family == "mistral":
        cfg = tf.MistralConfig(**llama_like, tie_word_embeddings=False, sliding_window=None)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**llama_like, tie_word_embeddings=True)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**llama_like, head_dim=32, tie_word_embeddings=True)
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def save_hf_checkpoint(family: str, out: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(family)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if family != "gpt2":
        # transformers initialises norms to 1 and biases to 0; perturb them so the test sees them
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER_DIR / name, out / name)
    return out


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {f: save_hf_checkpoint(f, root / f) for f in ("llama", "mistral", "qwen2", "qwen3", "gpt2")}


@pytest.fixture(scope="module")
def server():
    """A real uvicorn server on loopback over a tiny engine, one per test module (its own cache)."""
    from test_server_harness import running, serve, tiny_engine

    with running(tiny_engine()) as aengine, serve(aengine) as srv:
        yield srv


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free loopback port, killed after the test."""
    from redis_server import RedisServer

    srv = RedisServer(tmp_path).start()
    try:
        yield srv
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.resume()  # a paused server must be able to die
        srv.kill()
