"""Engine configuration: one small frozen dataclass per concern, validated where it is built, owning
its command-line flags (``promptcache/flags.py``)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from promptcache.cache.hashing import DEFAULT_HASH_SEED
from promptcache.flags import add_flags, opt, parse_bytes, values_from_args

# every dtype spelling accepted -> its torch name (engine/precision.py maps those to torch dtypes)
DTYPE_ALIASES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                 "float32": "float32", "fp32": "float32"}
DTYPE_NAMES = ("auto", *DTYPE_ALIASES)
_DTYPES = DTYPE_NAMES  # every spelling is accepted by the flags too


def _check_dtype(name: str, value: str) -> None:
    if value not in DTYPE_NAMES:
        raise ValueError(f"{name} must be auto, bfloat16, float16 or float32; got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """What runs: the checkpoint, where, and in which precision (policy: engine/precision.py)."""

    model: str | None = opt(None, "checkpoint directory, hub id, or random:<shape> (default: the embedded demo model)")
    dtype: str = opt("auto", "weights' dtype; auto = bfloat16 where 16-bit math is native (GPU, "
                     "AVX512-BF16/AMX CPU), else float32", choices=_DTYPES)
    compute_dtype: str = opt("auto", "dtype matmuls run in: auto (16-bit where native, else float32), float32, "
                             "or the --dtype itself (forces native 16-bit math, emulated on CPUs without it)",
                             choices=_DTYPES)
    kv_cache_dtype: str = opt("auto", "KV cache dtype; auto = the compute dtype", choices=_DTYPES)
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    max_model_len: int | None = opt(None, "context length (default: the model's, capped at 32768)")
    deterministic: bool = opt(False, "bit-identical logits whether a prefix was cached or computed, whatever "
                              "the batch or step budget (slower; docs/architecture.md)")

    def __post_init__(self) -> None:
        for name in ("dtype", "kv_cache_dtype", "compute_dtype"):
            _check_dtype(name, getattr(self, name))
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")


@dataclass(frozen=True)
class CacheConfig:
    """The KV pool and the prefix cache's rules."""

    block_size: int = opt(16, "tokens per KV block (cache hits are whole blocks)")
    kv_cache_memory: int | str = opt("1GiB", "KV cache budget, e.g. 512MiB, 4GiB", metavar="SIZE", parse=str)
    num_blocks: int | None = opt(None, "exact KV block count; overrides kv_cache_memory", cli=False)
    enable_prefix_caching: bool = opt(True, "disable prefix reuse (for comparisons)", flag="--no-prefix-cache")
    hash_seed: bytes = opt(DEFAULT_HASH_SEED, "key of every block hash: processes sharing a tier must agree",
                           parse=str.encode, metavar="TEXT")
    inflight_wait_s: float = opt(30.0, "longest a request waits for blocks another request is computing, s")

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size > 1024:
            raise ValueError(f"block_size must be in [1, 1024], got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        if parse_bytes(self.kv_cache_memory) < 1:
            raise ValueError("kv_cache_memory must be at least one byte")
        if not self.hash_seed:
            raise ValueError("hash_seed must not be empty")
        if not 0 <= self.inflight_wait_s < float("inf"):
            raise ValueError("inflight_wait_s must be a finite number of seconds >= 0")


@dataclass(frozen=True)
class SchedulerConfig:
    """How each step's token budget is spent, and the sampler's base seed."""

    max_num_batched_tokens: int = opt(2048, "tokens per step; longer prompts are chunked")
    max_num_seqs: int = opt(64, "requests running at once")
    seed: int = opt(0, "base seed of requests that set none (a request's own seed fixes its samples)",
                    flag="--sampler-seed")

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")


TIER_ADMISSIONS = ("prompt", "retained")


@dataclass(frozen=True)
class TierConfig:
    """Tiers below memory (cache/tiers.py): a disk directory that survives restarts, a Redis shared
    by replicas. Off unless a directory or URL is given."""

    disk_cache: str | None = opt(None, "directory of a disk KV tier that survives restarts", metavar="DIR")
    disk_cache_size: int | str = opt("20GiB", "disk tier capacity (least recently used objects go first)",
                                     metavar="SIZE", parse=str)
    disk_cache_fsync: bool = opt(True, "skip fsync on disk-tier writes (faster, not crash-safe)")
    redis_url: str | None = opt(None, "Redis KV tier shared by servers, e.g. redis://localhost:6379/0",
                                metavar="URL")
    redis_ttl: float = opt(3600.0, "seconds a block stays in Redis after its last use (longer retentions win)")
    redis_timeout: float = opt(0.25, "seconds any Redis call may take before it counts as a miss")
    redis_cooldown: float = opt(5.0, "seconds Redis is left alone (every call a miss) after 3 failures in a row")
    tier_admission: str = opt("prompt", "which blocks are written below memory: every full prompt block, or "
                              "only blocks under a retention or breakpoint", choices=TIER_ADMISSIONS)
    tier_write_queue: int | str = opt("256MiB", "bytes of writes queued per tier; past it writes are dropped",
                                      metavar="SIZE", parse=str)
    tier_skip_slower: bool = opt(True, "load from a tier even when its measured rate says recomputing is faster")
    disk_write_delay_s: float = opt(0.0, "test hook: pause mid-write", cli=False)

    def __post_init__(self) -> None:
        if self.disk_cache is not None and not self.disk_cache.strip():
            raise ValueError("disk_cache must be a directory path")
        if parse_bytes(self.disk_cache_size) < 1:
            raise ValueError("disk_cache_size must be at least one byte")
        if parse_bytes(self.tier_write_queue) < 1:
            raise ValueError("tier_write_queue must be at least one byte")
        if not 0 < self.redis_ttl <= 30 * 86400:
            raise ValueError("redis_ttl must be in (0, 30 days] seconds")
        if not 0 < self.redis_timeout <= 60:
            raise ValueError("redis_timeout must be in (0, 60] seconds")
        if not 0 <= self.redis_cooldown <= 3600:
            raise ValueError("redis_cooldown must be in [0, 3600] seconds")
        if self.tier_admission not in TIER_ADMISSIONS:
            raise ValueError(f"tier_admission must be one of {', '.join(TIER_ADMISSIONS)}")

    @property
    def enabled(self) -> bool:
        return self.disk_cache is not None or self.redis_url is not None


_PARTS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig, "tiers": TierConfig}
_OWNER = {f.name: part for part, cls in _PARTS.items() for f in fields(cls)}


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings, one frozen config per concern. Build it flat (``EngineConfig.of(
    block_size=32, dtype="float32")``: each keyword goes to the config that owns it) or from parts."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tiers: TierConfig = field(default_factory=TierConfig)

    def __post_init__(self) -> None:
        if self.scheduler.max_num_batched_tokens < self.cache.block_size:
            raise ValueError("max_num_batched_tokens must be at least block_size")

    @classmethod
    def of(cls, **settings: Any) -> EngineConfig:
        return cls().replace(**settings)

    def replace(self, **settings: Any) -> EngineConfig:
        """A copy with flat settings changed, e.g. ``config.replace(enable_prefix_caching=False)``."""
        unknown = sorted(set(settings) - set(_OWNER))
        if unknown:
            raise ValueError(f"unknown engine setting(s) {', '.join(unknown)}; known: {', '.join(sorted(_OWNER))}")
        parts = {}
        for part in _PARTS:
            mine = {k: v for k, v in settings.items() if _OWNER[k] == part}
            parts[part] = dataclasses.replace(getattr(self, part), **mine) if mine else getattr(self, part)
        return EngineConfig(**parts)


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Every engine flag, generated from the configs above (one definition each)."""
    for title, cls in (("model", ModelConfig), ("KV cache", CacheConfig), ("tiers below memory", TierConfig),
                       ("scheduler", SchedulerConfig)):
        add_flags(parser.add_argument_group(title), cls)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{part: cls(**values_from_args(cls, args)) for part, cls in _PARTS.items()})
