"""Find a checkpoint (local directory, hub id, ``random:<shape>``, or the embedded default) and load it.

Weights are read from safetensors (one file or shards listed in ``model.safetensors.index.json``)
and mapped from transformers' parameter names onto ours, fusing q|k|v and gate|up as they load.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from promptcache.model.config import ArchConfig, arch_from_hf_config
from promptcache.model.shapes import DEFAULT_MODEL_DIR, random_checkpoint
from promptcache.model.transformer import CausalLM

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


def _llama_plan(cfg: ArchConfig, w: _Weights) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    yield "embed.weight", lambda: w["model.embed_tokens.weight"]
    yield "norm.weight", lambda: w["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", lambda: w["lm_head.weight"]
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        qkv = [src + f"self_attn.{p}_proj" for p in "qkv"]
        yield dst + "attn.qkv.weight", lambda qkv=qkv: torch.cat([w[n + ".weight"] for n in qkv])
        if cfg.qkv_bias:
            yield dst + "attn.qkv.bias", lambda qkv=qkv: torch.cat([w[n + ".bias"] for n in qkv])
        yield dst + "attn.o.weight", lambda s=src: w[s + "self_attn.o_proj.weight"]
        if cfg.o_bias:
            yield dst + "attn.o.bias", lambda s=src: w[s + "self_attn.o_proj.bias"]
        if cfg.qk_norm:
            yield dst + "attn.q_norm.weight", lambda s=src: w[s + "self_attn.q_norm.weight"]
            yield dst + "attn.k_norm.weight", lambda s=src: w[s + "self_attn.k_norm.weight"]
        gate_up = [src + "mlp.gate_proj", src + "mlp.up_proj"]
        yield dst + "mlp.up.weight", lambda g=gate_up: torch.cat([w[n + ".weight"] for n in g])
        yield dst + "mlp.down.weight", lambda s=src: w[s + "mlp.down_proj.weight"]
        if cfg.mlp_bias:
            yield dst + "mlp.up.bias", lambda g=gate_up: torch.cat([w[n + ".bias"] for n in g])
            yield dst + "mlp.down.bias", lambda s=src: w[s + "mlp.down_proj.bias"]
        yield dst + "attn_norm.weight", lambda s=src: w[s + "input_layernorm.weight"]
        yield dst + "mlp_norm.weight", lambda s=src: w[s + "post_attention_layernorm.weight"]


def _gpt2_plan(cfg: ArchConfig, w: _Weights) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    yield "embed.weight", lambda: w["wte.weight"]
    yield "pos_embed.weight", lambda: w["wpe.weight"]
    yield "norm.weight", lambda: w["ln_f.weight"]
    yield "norm.bias", lambda: w["ln_f.bias"]
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", lambda: w["lm_head.weight"]
    # GPT-2 stores Conv1D weights as [in, out]; nn.Linear wants [out, in].
    pairs = {"attn.qkv": "attn.c_attn", "attn.o": "attn.c_proj", "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"}
    norms = {"attn_norm": "ln_1", "mlp_norm": "ln_2"}
    for i in range(cfg.num_layers):
        src, dst = f"h.{i}.", f"layers.{i}."
        for ours, theirs in pairs.items():
            yield dst + ours + ".weight", lambda n=src + theirs: w[n + ".weight"].t()
            yield dst + ours + ".bias", lambda n=src + theirs: w[n + ".bias"]
        for ours, theirs in norms.items():
            for kind in ("weight", "bias"):
                yield dst + f"{ours}.{kind}", lambda n=src + f"{theirs}.{kind}": w[n]


@dataclass
class LoadedModel:
    model: CausalLM
    arch: ArchConfig
    directory: Path
    hf_config: dict[str, Any]
    generation_config: dict[str, Any]


def load_model(
    model_dir: Path, dtype: torch.dtype, device: torch.device, max_model_len: int | None = None
) -> LoadedModel:
    hf_config = load_hf_config(model_dir)
    arch = arch_from_hf_config(hf_config)
    with torch.device("meta"):
        model = CausalLM(arch, max_model_len=max_model_len)
    model.to_empty(device=device)
    model.to(dtype)
    params = dict(model.named_parameters(remove_duplicate=False))
    plan_fn = _llama_plan if arch.family == "llama" else _gpt2_plan
    with ExitStack() as stack:
        weights = _Weights(_weight_files(model_dir), stack)
        plan = list(plan_fn(arch, weights))
        # tqdm's delay keeps small models silent; a bar appears only when loading takes a while
        for name, fetch in tqdm(plan, desc="loading weights", unit="tensor", delay=2.0, leave=False):
            try:
                tensor = fetch()
            except KeyError as e:
                raise ValueError(f"{model_dir}: checkpoint lacks tensor {e} needed for {name}") from e
            target = params[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor.to(dtype))
    model.finish_loading(device)
    model.eval()
    return LoadedModel(model, arch, model_dir, hf_config, load_generation_config(model_dir))
