"""The namespace rule, in one place: which cached K/V a request may reuse.

A block's address is chained from a root that frames everything its K/V bytes depend on besides
its tokens — the model's *content*, the dtypes it was computed and stored in, the KV layout — and
the tenant, so two tenants never share a block and a tier shared by several processes or machines
never serves one model's K/V to another.

Model identity is a digest of ``config.json`` and of every weight file's *bytes* (not their names
or sizes: two fine-tunes of one shape, or two ``make-model`` seeds, have equal sizes). Hashing a
checkpoint reads it once (about 1 s/GB); the digest is kept in a small file beside the checkpoint
(or under ``~/.cache/promptcache/identity`` when that directory is read-only), valid while every
file's size and modification time are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from promptcache.cache.hashing import DEFAULT_HASH_SEED, BlockHash, namespace_hash
from promptcache.home import cache_root

IDENTITY_FILE = ".promptcache-identity.json"
KV_LAYOUT = "kv-head-major-v1"  # bump when the bytes a block's K/V are stored as change meaning
_CHUNK = 1 << 22


def _content_files(model_dir: Path) -> list[Path]:
    files = [model_dir / "config.json"]
    files += sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    return files


def _stamp(files: list[Path]) -> list[list[object]]:
    return [[f.name, (st := f.stat()).st_size, st.st_mtime_ns] for f in files]


def _digest(files: list[Path]) -> str:
    h = hashlib.blake2b(digest_size=32)
    for f in files:
        name = f.name.encode()
        h.update(len(name).to_bytes(8, "little") + name + f.stat().st_size.to_bytes(8, "little"))
        with f.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _cache_locations(model_dir: Path) -> list[Path]:
    key = hashlib.blake2b(str(model_dir.resolve()).encode(), digest_size=16).hexdigest()
    return [model_dir / IDENTITY_FILE, cache_root() / "identity" / f"{key}.json"]


def model_identity(model_dir: Path) -> str:
    """Content digest of a checkpoint directory, computed once and kept beside it."""
    files = _content_files(model_dir)
    stamp = _stamp(files)
    for path in _cache_locations(model_dir):
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(saved, dict) and saved.get("files") == stamp and isinstance(saved.get("digest"), str):
            return saved["digest"]
    digest = _digest(files)
    record = json.dumps({"digest": digest, "files": stamp})
    for path in _cache_locations(model_dir):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(record)
            tmp.replace(path)  # atomic: a reader sees the old record or the new, never half of one
            break
        except OSError:
            continue  # read-only checkpoint: try the user cache; neither writable: recompute next time
    return digest


@dataclass(frozen=True)
class Namespace:
    """Everything but the tokens that a block's K/V depend on. ``root(tenant)`` starts each chain."""

    model: str  # model_identity(): content digest of the checkpoint
    compute_dtype: str  # what the K/V were computed in ("bfloat16", ...)
    kv_dtype: str  # what they are stored in
    weights_dtype: str = ""  # the values the weights were rounded to (bf16 weights in float32 math)
    device: str = "cpu"  # the hardware (engine/precision.py hardware_key): kernels round differently
    kv_layout: str = KV_LAYOUT
    deterministic: bool = False  # deterministic mode computes other bits for the same tokens
    seed: bytes = DEFAULT_HASH_SEED
    linears: str = ""  # a linear kernel other than the dtypes' default (model/loader.py LoadedModel.linears)

    @property
    def key(self) -> str:
        """The model part of the root, as framed into the hash (also a tier's compatibility key)."""
        mode = "deterministic" if self.deterministic else "default"
        parts = (self.model, self.weights_dtype or self.compute_dtype, self.compute_dtype, self.kv_dtype,
                 self.device, self.kv_layout, mode) + ((self.linears,) if self.linears else ())
        return "|".join(parts)

    def root(self, tenant: str | None) -> BlockHash:
        return namespace_hash(self.key, tenant, self.seed)
