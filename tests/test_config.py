"""Configs own their flags: one definition per setting, the same validation from Python and the CLI."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from promptcache import LLM
from promptcache.cli import build_parser
from promptcache.engine.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    add_engine_flags,
    engine_config_from_args,
)
from promptcache.engine.request import RequestSpec
from promptcache.flags import add_flags, values_from_args
from promptcache.server.config import ServerConfig


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_engine_flags(p)
    return p.parse_args(argv)


def test_every_setting_has_one_flag_and_its_default():
    p = argparse.ArgumentParser()
    add_engine_flags(p)
    defaults = engine_config_from_args(p.parse_args([]))
    assert defaults == EngineConfig()
    for cls in (ModelConfig, CacheConfig, SchedulerConfig):
        for f in dataclasses.fields(cls):
            if f.metadata["cli"]:
                assert f"{cls.__name__}.{f.name}" in vars(p.parse_args([])), f.name
    assert "CacheConfig.num_blocks" not in vars(p.parse_args([]))  # a Python-only setting (tests)


def test_flags_reach_the_config_that_owns_them():
    args = _parse("--block-size", "32", "--no-prefix-cache", "--hash-seed", "tenant-fleet-7", "--sampler-seed",
                  "9", "--inflight-wait-s", "2.5", "--max-num-batched-tokens", "64", "--dtype", "float32",
                  "--deterministic", "--kv-cache-memory", "8MiB")
    cfg = engine_config_from_args(args)
    assert cfg == EngineConfig.of(block_size=32, enable_prefix_caching=False, hash_seed=b"tenant-fleet-7", seed=9,
                                  inflight_wait_s=2.5, max_num_batched_tokens=64, dtype="float32",
                                  deterministic=True, kv_cache_memory="8MiB")
    assert cfg.cache.block_size == 32 and cfg.scheduler.seed == 9 and cfg.model.deterministic


def test_bad_settings_fail_the_same_way_from_python_and_flags():
    with pytest.raises(ValueError, match="unknown engine setting"):
        EngineConfig.of(blok_size=16)
    with pytest.raises(ValueError, match="unknown engine setting"):
        LLM("random:tiny", blok_size=16)
    with pytest.raises(ValueError, match="block_size"):
        engine_config_from_args(_parse("--block-size", "0"))
    with pytest.raises(ValueError, match="at least block_size"):
        EngineConfig.of(block_size=64, max_num_batched_tokens=32)
    with pytest.raises(ValueError, match="inflight_wait_s"):
        EngineConfig.of(inflight_wait_s=float("nan"))


def test_hash_seed_flag_changes_every_block_address():
    a = LLM("random:tiny", num_blocks=8, device="cpu").engine
    b = LLM("random:tiny", num_blocks=8, device="cpu", hash_seed=b"other-fleet").engine
    from promptcache import SamplingParams

    prompt = list(range(100, 132))
    ha = a.add_request(RequestSpec("r", prompt, SamplingParams(max_tokens=1))).block_hashes
    hb = b.add_request(RequestSpec("r", prompt, SamplingParams(max_tokens=1))).block_hashes
    assert len(ha) == 2 and not set(ha) & set(hb)


def test_server_config_flags():
    p = argparse.ArgumentParser()
    add_flags(p, ServerConfig)
    cfg = ServerConfig(**values_from_args(ServerConfig, p.parse_args(
        ["--port", "9000", "--max-request-bytes", "1MiB", "--served-model-name", "a", "--served-model-name", "b"])))
    assert cfg.port == 9000 and cfg.max_request_bytes == 2**20 and cfg.served_model_name == ("a", "b")
    assert ServerConfig(**values_from_args(ServerConfig, p.parse_args([]))) == ServerConfig()
    with pytest.raises(ValueError, match="max_waiting"):
        ServerConfig(max_waiting=-1)


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 16)" in out and "(default: 127.0.0.1)" in out and "--sampler-seed SEED" in out
    assert "--block-size BLOCK_SIZE" in out and "CONFIG." not in out  # dests never leak into --help


def test_command_flags_never_collide_with_engine_flags():
    """generate --seed is a request's seed and bench --seed the prompts'; --sampler-seed is the engine's."""
    gen = build_parser().parse_args(["generate", "hi", "--seed", "5"])
    assert gen.seed == 5 and engine_config_from_args(gen).scheduler.seed == 0
    gen = build_parser().parse_args(["generate", "hi", "--sampler-seed", "7"])
    assert gen.seed is None and engine_config_from_args(gen).scheduler.seed == 7
    bench = build_parser().parse_args(["bench", "--seed", "3", "--sampler-seed", "4"])
    assert bench.seed == 3 and engine_config_from_args(bench).scheduler.seed == 4


def test_dtype_aliases_are_accepted_by_flags():
    cfg = engine_config_from_args(_parse("--dtype", "bf16", "--kv-cache-dtype", "fp32"))
    assert cfg.model.dtype == "bf16" and cfg.model.kv_cache_dtype == "fp32"
