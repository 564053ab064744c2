"""Which device and dtypes an engine runs in: the one place for the policy.

``dtype`` is the weights' values (what the user asked for); the *compute* dtype is what matmuls and
attention run in; the KV cache dtype is what is stored. The policy, per machine:

| machine                                   | ``dtype="auto"`` | compute for a 16-bit dtype      |
| ----------------------------------------- | ---------------- | ------------------------------- |
| CUDA GPU                                  | bfloat16 (fp16 pre-Ampere) | the 16-bit dtype (native) |
| CPU with AVX512-BF16 or AMX-BF16          | bfloat16         | bf16 native; fp16 per fp16 flag |
| CPU with AVX512-FP16 or AMX-FP16          | (bf16 flag rule) | fp16 native                     |
| CPU without them (AVX2-only, most AMD)    | float32          | float32 on the 16-bit values    |

``compute_dtype`` overrides the choice, so every policy runs on every machine: ``"bfloat16"`` on an
AVX2-only CPU runs the native-bf16 code path (emulated, ~10x slower, same code), ``"float32"`` on a
native-bf16 CPU runs the upcast path. The tests force both.
"""

from __future__ import annotations

import functools

import torch

from promptcache.engine.config import DTYPE_ALIASES

DTYPES: dict[str, torch.dtype] = {alias: getattr(torch, name) for alias, name in DTYPE_ALIASES.items()}  # one table


# the flags that decide a dtype policy, reported beside every benchmark figure
POLICY_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; ("", {}) where there is none."""
    model, flags = "", frozenset[str]()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


def _cpu_flags() -> frozenset[str]:
    return _cpuinfo()[1]


def cpu_model() -> str:
    return _cpuinfo()[0]


def policy_flags() -> list[str]:
    """Which of ``POLICY_FLAGS`` this CPU has."""
    return [f for f in POLICY_FLAGS if f in _cpu_flags()]


def cpu_has_native_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def cpu_has_native_fp16() -> bool:
    return bool({"avx512_fp16", "amx_fp16"} & _cpu_flags())


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device; use --device cpu")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The weights' dtype: ``auto`` is bfloat16 where 16-bit math is native (GPUs, bf16 CPUs)."""
    if name == "auto":
        if device.type == "cuda":  # pre-Ampere GPUs (T4, V100) have fp16 tensor cores, not bf16
            # (is_bf16_supported() counts emulation as support, and asks the current device)
            return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use auto, bfloat16, float16 or float32")
    return DTYPES[name]


def native_compute(dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cpu" or dtype == torch.float32:
        return True
    return cpu_has_native_bf16() if dtype == torch.bfloat16 else cpu_has_native_fp16()


def compute_dtype_for(dtype: torch.dtype, device: torch.device, requested: str = "auto") -> torch.dtype:
    """The dtype matmuls run in. A CPU without native bf16/fp16 arithmetic emulates it about 13x
    slower than float32 (measured), so there the weights are upcast once at load — bf16 values are
    exact in float32 — and only the KV cache keeps the requested 16-bit dtype (its memory is the
    cache's capacity). llama.cpp makes the same choice for bf16 weights on such CPUs.

    ``requested`` forces a policy: ``float32`` (upcast anywhere) or the weights' own dtype (native
    16-bit math anywhere, emulated where the CPU lacks it)."""
    if requested == "auto":
        return dtype if native_compute(dtype, device) else torch.float32
    if requested not in DTYPES:
        raise ValueError(f"unknown compute dtype {requested!r}; use auto, float32 or the model dtype")
    forced = DTYPES[requested]
    if forced not in (torch.float32, dtype):
        raise ValueError(
            f"compute dtype {requested!r} does not fit weights in {str(dtype).removeprefix('torch.')}: "
            "matmuls run either in float32 or in the weights' own dtype"
        )
    return forced


def hardware_key(device: torch.device) -> str:
    """What, besides dtypes, decides the bits a kernel computes: the CPU's SIMD/matrix extensions or
    the GPU's compute capability (part of the cache namespace: a shared tier never mixes them)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}"
    return "cpu-" + "+".join(policy_flags()) if policy_flags() else "cpu"


def dtype_name(t: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (reports, banners, the cache namespace)."""
    return str(t).removeprefix("torch.")


def describe(dtype: torch.dtype, compute: torch.dtype, kv: torch.dtype, device: torch.device) -> str:
    """One line for logs and banners: which policy this machine got, and whether it is native."""
    name = dtype_name
    how = "native" if native_compute(compute, device) else "emulated: forced, slow"
    math = "float32 math" if compute == torch.float32 else f"{name(compute)} math ({how})"
    values = "" if dtype == compute else f" on {name(dtype)} weights"
    return f"{device.type}, {math}{values}, {name(kv)} KV cache"
