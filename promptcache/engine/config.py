"""Engine configuration: small frozen dataclasses, validated where they are built."""

from __future__ import annotations

import re
from dataclasses import dataclass

from promptcache.cache.hashing import DEFAULT_HASH_SEED

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "t": 10**12, "tb": 10**12}


def parse_bytes(value: str | int) -> int:
    """``"4GiB"``, ``"512MiB"``, ``"2G"``, ``1073741824`` -> bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"invalid size {value!r}: use e.g. '512MiB', '4GiB', '2G' or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


DTYPE_NAMES = ("auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # local dir, hub id, random:<shape>, or None for the embedded default
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    kv_cache_dtype: str = "auto"  # auto (= the dtype matmuls run in) | bfloat16 | float16 | float32
    # the dtype matmuls run in: auto (native 16-bit where the hardware has it, else float32) | float32 |
    # the weights' dtype (forces native 16-bit math, emulated on CPUs without it); see engine/precision.py
    compute_dtype: str = "auto"
    # logits bit-identical whether a prefix was cached or computed, whatever the batch or step budget
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_model_len: int | None = None  # default: the model's max_position_embeddings (capped at 32k)
    # cache
    block_size: int = 16
    kv_cache_memory: int | str = "1GiB"  # KV budget in bytes, turned into a block count
    num_blocks: int | None = None  # exact block count (tests); overrides kv_cache_memory
    enable_prefix_caching: bool = True
    hash_seed: bytes = DEFAULT_HASH_SEED
    inflight_wait_s: float = 30.0  # longest a request waits for blocks another request is computing
    # scheduler
    max_num_batched_tokens: int = 2048  # tokens per step; long prompts are chunked to fit
    max_num_seqs: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size > 1024:
            raise ValueError(f"block_size must be in [1, 1024], got {self.block_size}")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_batched_tokens must be at least block_size")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        parse_bytes(self.kv_cache_memory)
        for name in ("dtype", "kv_cache_dtype", "compute_dtype"):
            value = getattr(self, name)
            if value not in DTYPE_NAMES:
                raise ValueError(f"{name} must be auto, bfloat16, float16 or float32; got {value!r}")
