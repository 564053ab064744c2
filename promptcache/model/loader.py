"""Find a checkpoint (local directory, hub id, ``random:<shape>``, or the embedded default) and load it.

Weights are read from safetensors (one file or shards listed in ``model.safetensors.index.json``)
and mapped from transformers' parameter names onto ours, fusing q|k|v and gate|up as they load.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from promptcache.model import native
from promptcache.model.config import ArchConfig, arch_from_hf_config
from promptcache.model.prepack import prepack_linears
from promptcache.model.shapes import DEFAULT_MODEL_DIR, random_checkpoint
from promptcache.model.transformer import CausalLM, Linear

CHECKPOINT_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "*.safetensors",
    "model.safetensors.index.json",
]


def resolve_model_dir(model: str | None) -> Path:
    """Turn what the user passed into a local checkpoint directory."""
    if model is None or model == "default":
        return DEFAULT_MODEL_DIR
    if model.startswith("random:"):
        return random_checkpoint(model.removeprefix("random:"))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"{path} is a directory but has no config.json: not a Hugging Face checkpoint")
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ValueError(f"model {model!r} is neither a checkpoint directory nor a hub id like 'org/name'")
    return _download(model)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=CHECKPOINT_FILES))
    except Exception as e:  # network, auth, offline mode: all end the same way for the user
        raise ValueError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "If this machine cannot reach the hub, download the checkpoint elsewhere "
            "(`huggingface-cli download ORG/NAME --local-dir DIR`) and pass the directory: --model DIR"
        ) from e


def load_hf_config(model_dir: Path) -> dict[str, Any]:
    return dict(json.loads((model_dir / "config.json").read_text()))


def load_generation_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "generation_config.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} has no safetensors weights (*.bin checkpoints are not supported)")
    return files


class _Weights:
    """Lazy name -> tensor view over all safetensors files of a checkpoint."""

    def __init__(self, files: list[Path], stack: ExitStack) -> None:
        self._where: dict[str, Any] = {}
        for f in files:
            handle = stack.enter_context(safe_open(str(f), framework="pt"))
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                self._where[name] = handle
        # GPT-2 checkpoints exist with and without the "transformer." prefix; drop it once here.
        self._alias = {
            k.removeprefix("transformer."): k for k in self._where if k.startswith("transformer.")
        }

    def __contains__(self, name: str) -> bool:
        return name in self._where or name in self._alias

    def __getitem__(self, name: str) -> torch.Tensor:
        name = self._alias.get(name, name)
        return self._where[name].get_tensor(name)


@dataclass(frozen=True)
class _Source:
    """How one of our parameters is made from checkpoint tensors: concatenated, maybe transposed."""

    names: tuple[str, ...]
    transpose: bool = False  # GPT-2 Conv1D stores [in, out]; nn.Linear wants [out, in]

    def load(self, w: _Weights) -> torch.Tensor:
        parts = [w[n] for n in self.names]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
        return tensor.t() if self.transpose else tensor


Plan = Iterator[tuple[str, _Source]]


def _llama_plan(cfg: ArchConfig) -> Plan:
    yield "embed.weight", _Source(("model.embed_tokens.weight",))
    yield "norm.weight", _Source(("model.norm.weight",))
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", _Source(("lm_head.weight",))
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        qkv = tuple(src + f"self_attn.{p}_proj" for p in "qkv")
        gate_up = (src + "mlp.gate_proj", src + "mlp.up_proj")
        yield dst + "attn.qkv.weight", _Source(tuple(n + ".weight" for n in qkv))
        if cfg.qkv_bias:
            yield dst + "attn.qkv.bias", _Source(tuple(n + ".bias" for n in qkv))
        yield dst + "attn.o.weight", _Source((src + "self_attn.o_proj.weight",))
        if cfg.o_bias:
            yield dst + "attn.o.bias", _Source((src + "self_attn.o_proj.bias",))
        if cfg.qk_norm:
            yield dst + "attn.q_norm.weight", _Source((src + "self_attn.q_norm.weight",))
            yield dst + "attn.k_norm.weight", _Source((src + "self_attn.k_norm.weight",))
        yield dst + "mlp.up.weight", _Source(tuple(n + ".weight" for n in gate_up))
        yield dst + "mlp.down.weight", _Source((src + "mlp.down_proj.weight",))
        if cfg.mlp_bias:
            yield dst + "mlp.up.bias", _Source(tuple(n + ".bias" for n in gate_up))
            yield dst + "mlp.down.bias", _Source((src + "mlp.down_proj.bias",))
        yield dst + "attn_norm.weight", _Source((src + "input_layernorm.weight",))
        yield dst + "mlp_norm.weight", _Source((src + "post_attention_layernorm.weight",))


def _gpt2_plan(cfg: ArchConfig) -> Plan:
    yield "embed.weight", _Source(("wte.weight",))
    yield "pos_embed.weight", _Source(("wpe.weight",))
    yield "norm.weight", _Source(("ln_f.weight",))
    yield "norm.bias", _Source(("ln_f.bias",))
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", _Source(("lm_head.weight",))
    linears = {"attn.qkv": "attn.c_attn", "attn.o": "attn.c_proj", "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"}
    norms = {"attn_norm": "ln_1", "mlp_norm": "ln_2"}
    for i in range(cfg.num_layers):
        src, dst = f"h.{i}.", f"layers.{i}."
        for ours, theirs in linears.items():
            yield dst + ours + ".weight", _Source((src + theirs + ".weight",), transpose=True)
            yield dst + ours + ".bias", _Source((src + theirs + ".bias",))
        for ours, theirs in norms.items():
            for kind in ("weight", "bias"):
                yield dst + f"{ours}.{kind}", _Source((src + f"{theirs}.{kind}",))


@dataclass
class LoadedModel:
    model: CausalLM
    arch: ArchConfig
    directory: Path
    hf_config: dict[str, Any]
    generation_config: dict[str, Any]
    # what multiplies the linears, where it is not the dtypes' default (it sets the K/V's bits: part
    # of the cache namespace): "bf16-panels" (ops_f32.c's linear_w16), else ""
    linears: str = ""


def load_model(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int | None = None,
    value_dtype: torch.dtype | None = None,
    deterministic: bool = False,
    prepack: bool = True,
) -> LoadedModel:
    """Weights are stored in ``dtype`` (the compute dtype) holding values rounded to ``value_dtype``
    (the dtype asked for): bfloat16 weights upcast to float32 compute keep their bfloat16 values,
    whatever the checkpoint file's dtype."""
    hf_config = load_hf_config(model_dir)
    arch = arch_from_hf_config(hf_config)
    rounding = value_dtype or dtype
    with torch.device("meta"):
        model = CausalLM(arch, max_model_len=max_model_len, deterministic=deterministic)
    model.to_empty(device=device)
    model.to(dtype)
    lib = native.ops_library(dtype) if device.type == "cpu" and not deterministic else None
    # float32 math on bf16 values with our float32 kernels: the linears keep only bf16 panels
    # (model/prepack.py; batch-invariant, so deterministic mode takes them too), so they load in
    # bf16 (exact) and a float32 copy never exists
    panels = (prepack and device.type == "cpu" and dtype == torch.float32 and rounding == torch.bfloat16
              and native.native_f32())
    w16_lib = native.library_f32() if panels else None
    if w16_lib is not None:
        for module in model.modules():
            if isinstance(module, Linear) and not (module is model.lm_head and arch.tie_word_embeddings):
                module.weight = torch.nn.Parameter(torch.empty_like(module.weight, dtype=torch.bfloat16),
                                                   requires_grad=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    plan_fn = _llama_plan if arch.family == "llama" else _gpt2_plan
    with ExitStack() as stack:
        weights = _Weights(_weight_files(model_dir), stack)
        plan = list(plan_fn(arch))
        # tqdm's delay keeps small models silent; a bar appears only when loading takes a while
        for name, source in tqdm(plan, desc="loading weights", unit="tensor", delay=2.0, leave=False):
            try:
                tensor = source.load(weights)
            except KeyError as e:
                raise ValueError(f"{model_dir}: checkpoint lacks tensor {e} needed for {name}") from e
            target = params[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor.to(rounding).to(target.dtype))  # bf16 linears (above): no float32 copy
    del params  # the plain weights must not outlive packing (one copy of each at a time)
    model.finish_loading(device)
    model.eval()
    if prepack and device.type == "cpu" and (not deterministic or w16_lib is not None):
        # oneDNN's layout once, not a reorder per call (not in deterministic mode: its row tiles);
        # bf16 panels as above; a tied embedding table in its values' dtype
        prepack_linears(model, embed_dtype=rounding if rounding != dtype else None, w16_lib=w16_lib,
                        deterministic=deterministic)
    if lib is not None:
        model.use_native_ops(lib)  # RMSNorm, RoPE, gated SiLU in one pass each
    linears = "bf16-panels" if any(isinstance(m, Linear) and m.w16 is not None for m in model.modules()) else ""
    return LoadedModel(model, arch, model_dir, hf_config, load_generation_config(model_dir), linears)
