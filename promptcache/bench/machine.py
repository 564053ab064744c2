"""What the machine can do and what the model costs: GEMM FLOP/s, model FLOPs, memory, percentiles."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from typing import Any

import torch

from promptcache.engine.precision import cpu_model, policy_flags
from promptcache.model.config import ArchConfig


def gemm_flops_per_s(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """Best-of-``repeats`` FLOP/s of ``[m, k] @ [k, n]`` in ``dtype`` (the model's largest matmul)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    with torch.inference_mode():
        torch.nn.functional.linear(a, w)  # warm-up: first call picks kernels and touches pages
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.nn.functional.linear(a, w)
            best = min(best, time.perf_counter() - start)
    return 2.0 * m * k * n / best


def _cpu_times() -> tuple[int, int] | None:
    """(total, idle + iowait) jiffies of all CPUs since boot; None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    return sum(fields[:8]), fields[3] + fields[4]  # guest time is already inside user and nice


def wait_for_quiet(max_s: float, window_s: float = 0.1, busy_cores: float = 0.5) -> float:
    """Wait until this host's CPUs are quiet — less than ``busy_cores`` cores' worth busy over a
    ``window_s`` window — or ``max_s`` passed; returns the seconds waited. Servers that share the
    host with the one being timed may keep a core busy after they answer (vLLM's CPU workers poll
    for about a second after each request), which would be timed as the next server's slowness."""
    start = time.perf_counter()
    cpus = os.cpu_count() or 1
    prev = _cpu_times()
    while prev is not None and time.perf_counter() - start < max_s:
        time.sleep(window_s)
        cur = _cpu_times()
        if cur is None or cur[0] <= prev[0]:  # gone, or a /proc/stat that does not advance
            break
        total, idle = cur[0] - prev[0], cur[1] - prev[1]
        if (total - idle) / total * cpus < busy_cores:
            break
        prev = cur
    return time.perf_counter() - start


class QuietHost:
    """``wait_for_quiet`` before each timed request, with up to ``max_s`` per wait — until waits
    keep running out: a host busy with other work (or a peer that never stops polling) would
    otherwise add ``max_s`` to every request. After ``give_up`` waits in a row hit the limit it
    warns once and stops waiting; ``timeouts`` counts the waits that hit it."""

    def __init__(self, max_s: float, give_up: int = 3) -> None:
        self.max_s, self.give_up = max_s, give_up
        self.timeouts = self._in_a_row = 0

    def __call__(self) -> float:
        if self._in_a_row >= self.give_up:
            return 0.0
        waited = wait_for_quiet(self.max_s)
        if waited >= self.max_s:
            self.timeouts += 1
            self._in_a_row += 1
            if self._in_a_row == self.give_up:
                print(f"promptcache bench: the host stayed busy for {self.max_s:g} s {self.give_up} times in a "
                      "row (other work on it?); no more waits for a quiet host this run", file=sys.stderr)
        else:
            self._in_a_row = 0
        return waited


def largest_gemm(arch: ArchConfig, num_tokens: int) -> tuple[int, int, int]:
    """(m, k, n) of the fused gate|up projection (or the MLP up projection) over ``num_tokens``."""
    gated = 2 if arch.family == "llama" else 1
    return num_tokens, arch.hidden_size, gated * arch.intermediate_size


def linear_params(arch: ArchConfig) -> int:
    """Weights every token multiplies through: all layers' projections (embedding lookup is free)."""
    return arch.num_params - arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)


def prefill_flops(arch: ArchConfig, num_new: int, num_cached: int = 0, logits_rows: int = 1) -> float:
    """FLOPs to run ``num_new`` tokens after ``num_cached`` cached ones (causal), plus the LM head.

    Projections and MLP: 2 x params per token. Attention: QK^T and AV, 2 x 2 x heads x head_dim per
    (query, visible key) pair; query i sees ``num_cached + i + 1`` keys.
    """
    visible = num_new * num_cached + num_new * (num_new + 1) / 2
    attn = 4.0 * arch.num_layers * arch.num_heads * arch.head_dim * visible
    head = 2.0 * logits_rows * arch.hidden_size * arch.vocab_size
    return 2.0 * linear_params(arch) * num_new + attn + head


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def describe_host() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_flags": policy_flags(),  # the ones that decide the dtype policy (engine/precision.py)
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _cpu_model() -> str:
    return cpu_model() or platform.processor() or "unknown"


def percentile(values: list[float], q: int) -> float:
    """Linear-interpolated percentile, ``q`` an integer in [0, 100]; NaN for no values."""
    if not values:
        return float("nan")
    if len(values) == 1 or q <= 0 or q >= 100:
        return min(values) if q <= 0 else max(values) if q >= 100 else values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def free_port() -> int:
    """A TCP port free on loopback now (for a server the bench starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
