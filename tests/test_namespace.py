"""The namespace rule: a block's address covers the model's content, dtypes, layout, mode, tenant."""

from __future__ import annotations

import json
import shutil

from promptcache import LLM
from promptcache.cache.namespace import IDENTITY_FILE, Namespace, model_identity
from promptcache.engine.request import RequestSpec
from promptcache.model.shapes import write_checkpoint


def test_identity_is_the_content_not_the_name_or_size(tmp_path):
    a = write_checkpoint("tiny", tmp_path / "a", seed=0)
    b = write_checkpoint("tiny", tmp_path / "b", seed=1)  # same shape: same file names and sizes
    copy = shutil.copytree(a, tmp_path / "copy")
    assert (a / "model.safetensors").stat().st_size == (b / "model.safetensors").stat().st_size
    assert model_identity(a) != model_identity(b)
    assert model_identity(copy) == model_identity(a)  # where it lives does not matter


def test_identity_is_kept_beside_the_checkpoint_until_a_file_changes(tmp_path):
    a = write_checkpoint("tiny", tmp_path / "a", seed=0)
    first = model_identity(a)
    saved = json.loads((a / IDENTITY_FILE).read_text())
    assert saved["digest"] == first
    # a forged record with the right stamp is believed: proof the bytes are not re-read each time
    (a / IDENTITY_FILE).write_text(json.dumps({**saved, "digest": "forged"}))
    assert model_identity(a) == "forged"
    # new weights of the same size (another seed): the stamp changes, the digest is recomputed
    write_checkpoint("tiny", tmp_path / "b", seed=2)
    shutil.copyfile(tmp_path / "b" / "model.safetensors", a / "model.safetensors")
    assert model_identity(a) == model_identity(tmp_path / "b") != first


def test_same_shape_checkpoints_never_share_a_block(tmp_path):
    a = write_checkpoint("tiny", tmp_path / "a", seed=0)
    b = write_checkpoint("tiny", tmp_path / "b", seed=1)
    prompt = list(range(100, 164))
    hashes = {}
    for name, path in (("a", a), ("b", b), ("a-copy", shutil.copytree(a, tmp_path / "a-copy"))):
        engine = LLM(str(path), dtype="float32", num_blocks=16, device="cpu").engine
        hashes[name] = engine.add_request(RequestSpec("r", prompt, _params())).block_hashes
    assert len(hashes["a"]) == 4
    assert not set(hashes["a"]) & set(hashes["b"])
    assert hashes["a"] == hashes["a-copy"]
    from promptcache.engine.precision import hardware_key, policy_flags

    namespace = LLM(str(a), dtype="bfloat16", compute_dtype="float32", num_blocks=16, device="cpu").engine.namespace
    assert namespace.weights_dtype == "bfloat16" and namespace.compute_dtype == "float32"
    assert namespace.device == hardware_key(namespace_device()) and all(f in namespace.device for f in policy_flags())


def test_root_frames_dtypes_layout_mode_and_tenant():
    base = Namespace(model="m", compute_dtype="bfloat16", kv_dtype="bfloat16")
    variants = [
        Namespace(model="m2", compute_dtype="bfloat16", kv_dtype="bfloat16"),
        Namespace(model="m", compute_dtype="float32", kv_dtype="bfloat16"),
        Namespace(model="m", compute_dtype="bfloat16", kv_dtype="float32"),
        Namespace(model="m", compute_dtype="bfloat16", kv_dtype="bfloat16", weights_dtype="float16"),
        Namespace(model="m", compute_dtype="bfloat16", kv_dtype="bfloat16", device="cuda"),
        Namespace(model="m", compute_dtype="bfloat16", kv_dtype="bfloat16", kv_layout="other"),
        Namespace(model="m", compute_dtype="bfloat16", kv_dtype="bfloat16", deterministic=True),
        Namespace(model="m", compute_dtype="bfloat16", kv_dtype="bfloat16", seed=b"other-seed"),
        Namespace(model="m", compute_dtype="bfloat16", kv_dtype="bfloat16", linears="bf16-panels"),
    ]
    roots = {base.root(None), base.root("acme")} | {v.root(None) for v in variants}
    assert len(roots) == 2 + len(variants)
    assert base.root("acme") == Namespace(model="m", compute_dtype="bfloat16", kv_dtype="bfloat16").root("acme")


def _params():
    from promptcache import SamplingParams

    return SamplingParams(max_tokens=1)


def namespace_device():
    import torch

    return torch.device("cpu")
