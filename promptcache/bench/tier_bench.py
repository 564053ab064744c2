"""``--workload tier``: TTFT of a prefix served from memory, disk and Redis vs recomputing it.

One run, the same token ids for every arm. Each repeat draws a new prefix P (``--prompt-tokens``)
and sends P + S (``--suffix-tokens`` new tokens, one generated token):

- **recompute**: P is new everywhere (the engine with the disk tier computes it and writes it);
- **memory**: P + S' again on that engine (an in-memory hit);
- **disk (page cache)**: that engine forgets its memory cache; P + S'' loads P from the files
  just written (the kernel still has them in its page cache);
- **disk (cold)**: the same after asking the kernel to drop the files' pages
  (``posix_fadvise(DONTNEED)``; what a restart after a while looks like);
- **redis**: another *process* computed P and wrote it to Redis; an engine with only the Redis
  tier loads it.

Without ``--redis-url`` a redis-server is started on a free loopback port when the binary exists;
without ``--disk-cache`` a temporary directory is used. Load throughput per tier (bytes read /
seconds loading) is reported beside this machine's memory copy rate.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from promptcache.bench.backends import EngineBackend
from promptcache.bench.machine import free_port
from promptcache.engine.config import EngineConfig
from promptcache.engine.llm_engine import LLMEngine
from promptcache.engine.request import RequestSpec
from promptcache.engine.sampling import SamplingParams

ONE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def ttft(engine: LLMEngine, rid: str, prompt: list[int]) -> tuple[float, int, dict[str, int]]:
    started = time.perf_counter()
    engine.add_request(RequestSpec(rid, prompt, ONE))
    while True:
        for out in engine.step():
            if out.request_id == rid and out.finished:
                return time.perf_counter() - started, out.usage.cached_tokens, out.usage.cached_tokens_by_tier


def memory_copy_gb_s(num_bytes: int = 256 << 20) -> float:
    src = np.ones(num_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return num_bytes / best / 1e9


def drop_page_cache(directory: Path) -> int:
    dropped = 0
    for f in (directory / "objects").rglob("*.kv"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            dropped += 1
        finally:
            os.close(fd)
    return dropped


class _Redis:
    """A redis-server of the bench's own, when no --redis-url is given."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="promptcache-bench-redis-")
        self.port = free_port()
        binary = shutil.which("redis-server")
        if binary is None:
            raise ValueError("the tier workload needs --redis-url or a redis-server binary on PATH")
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def write_in_another_process(config: EngineConfig, prompts: list[list[int]]) -> None:
    """Compute ``prompts`` in a fresh process whose engine writes to Redis, and wait for its writes."""
    spec = {"config": _flat(config), "prompts": prompts}
    subprocess.run([sys.executable, "-m", "promptcache.bench.tier_bench"], input=json.dumps(spec).encode(),
                   check=True)


def _flat(config: EngineConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in (config.model, config.cache, config.scheduler, config.tiers):
        for k, v in vars(part).items():
            out[k] = v.decode() if isinstance(v, bytes) else v
    return out


def _writer_main() -> None:
    spec = json.loads(sys.stdin.read())
    settings = spec["config"]
    settings["hash_seed"] = settings["hash_seed"].encode()
    engine = LLMEngine(EngineConfig.of(**settings))
    for i, prompt in enumerate(spec["prompts"]):
        ttft(engine, f"w{i}", prompt)
    engine.close()  # flushes the writes


class TierBench:
    def __init__(self, prompt_tokens: int = 2048, suffix_tokens: int = 128, repeats: int = 3, seed: int = 0):
        self.prompt_tokens, self.suffix_tokens, self.repeats, self.seed = prompt_tokens, suffix_tokens, repeats, seed

    def params(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "suffix_tokens": self.suffix_tokens, "repeats": self.repeats,
                "seed": self.seed}

    def run(self, config: EngineConfig) -> dict[str, Any]:
        own_redis = _Redis() if config.tiers.redis_url is None else None
        own_dir = tempfile.mkdtemp(prefix="promptcache-bench-disk-") if config.tiers.disk_cache is None else None
        disk_dir = Path(config.tiers.disk_cache or own_dir or "")
        redis_url = config.tiers.redis_url or (own_redis.url if own_redis else "")
        try:
            return self._run(config, disk_dir, redis_url)
        finally:
            if own_redis is not None:
                own_redis.close()
            if own_dir is not None:
                shutil.rmtree(own_dir, ignore_errors=True)

    def _run(self, config: EngineConfig, disk_dir: Path, redis_url: str) -> dict[str, Any]:
        base = config.replace(enable_prefix_caching=True, disk_cache=None, redis_url=None)
        disk_engine = LLMEngine(base.replace(disk_cache=str(disk_dir)))
        redis_cfg = base.replace(redis_url=redis_url)
        redis_engine = LLMEngine(redis_cfg)
        rng = random.Random(self.seed)
        vocab = disk_engine.runner.loaded.arch.vocab_size

        def draw(n: int) -> list[int]:
            return [rng.randrange(10, vocab) for _ in range(n)]

        warm = draw(self.prompt_tokens + self.suffix_tokens)  # first calls pay for allocation and kernels
        ttft(disk_engine, "warm", warm)
        ttft(redis_engine, "warm", draw(self.prompt_tokens + self.suffix_tokens))
        prefixes = [draw(self.prompt_tokens) for _ in range(self.repeats)]
        write_in_another_process(redis_cfg, prefixes)
        arms: dict[str, list[float]] = {k: [] for k in ("recompute", "memory", "disk_page_cache", "disk_cold",
                                                         "redis")}
        cached: dict[str, list[int]] = {k: [] for k in arms}
        for r, prefix in enumerate(prefixes):
            steps = [("recompute", disk_engine, None), ("memory", disk_engine, None),
                     ("disk_page_cache", disk_engine, "reset"), ("disk_cold", disk_engine, "drop"),
                     ("redis", redis_engine, None)]
            for name, engine, before in steps:
                if before is not None:
                    assert disk_engine.tiers is not None and disk_engine.tiers.flush(60)
                    disk_engine.reset_prefix_cache()
                    if before == "drop":
                        drop_page_cache(disk_dir)
                seconds, hit, _ = ttft(engine, f"{name}-{r}", prefix + draw(self.suffix_tokens))
                arms[name].append(seconds)
                cached[name].append(hit)
        tiers = {**disk_engine.tier_stats(), **redis_engine.tier_stats()}
        rates = {name: (row["bytes_read"] / row["load_seconds"] / 1e9 if row["load_seconds"] else None)
                 for name, row in tiers.items()}
        ms = {name: round(1000 * statistics.median(v), 1) for name, v in arms.items()}
        rec = ms["recompute"]
        result = {
            "median_ttft_ms": ms,
            "ratio_to_recompute": {k: round(v / rec, 3) for k, v in ms.items()},
            "cached_tokens": {k: statistics.median(v) for k, v in cached.items()},
            "load_gb_s": {k: None if v is None else round(v, 2) for k, v in rates.items()},
            "memory_copy_gb_s": round(memory_copy_gb_s(), 2),
            "block_bytes": disk_engine.runner.block_bytes,
            "tier_counters": tiers,
            "engine": EngineBackend(disk_engine, "cache").describe(),
        }
        disk_engine.close()
        redis_engine.close()
        return result


def tier_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    ratio = result["ratio_to_recompute"]
    return [
        {"name": "TTFT, prefix from disk (cold page cache) / recomputing", "value": ratio["disk_cold"],
         "limit": 0.25, "met": ratio["disk_cold"] <= 0.25},
        {"name": "TTFT, prefix from Redis (another process wrote it) / recomputing", "value": ratio["redis"],
         "limit": 0.5, "met": ratio["redis"] <= 0.5},
    ]


if __name__ == "__main__":
    _writer_main()
