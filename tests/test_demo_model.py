"""The embedded demo model (trained by scripts/train_demo_model.py) writes Python: its held-out loss,
its size, and its greedy completions, the same with the cache on and off and the same as
transformers'."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from promptcache import LLM, SamplingParams
from promptcache.model.demo_corpus import (
    HELD_OUT,
    TRAIN_PACKAGES,
    held_out_files,
    held_out_sample,
    stdlib,
    train_files,
)
from promptcache.model.shapes import DEFAULT_MODEL_DIR, TOKENIZER_DIR

PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef read_lines(path):", "class Stack:\n    def __init__(self):"]
BOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()


def test_held_out_files_were_never_trained_on() -> None:
    train, held = set(train_files()), set(held_out_files())
    assert train and held and not train & held
    assert not set(HELD_OUT) & set(TRAIN_PACKAGES)
    # the shipped tokenizer was trained on the top-level modules only (scripts/build_assets.py)
    assert all(p.parent != stdlib() for p in held)


def test_held_out_bits_per_byte_at_most_two(hf) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    texts = held_out_sample()
    assert len(texts) >= 10 and sum(len(t) for t in texts) > 10_000
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for text in texts:  # every byte is predicted: scoring starts after a BOS token
            ids = torch.tensor([[tok.token_to_id(BOS)] + tok.encode(text).ids])
            logits = hf(input_ids=ids).logits[0, :-1]
            nats += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            nbytes += len(text.encode("utf-8"))
    bits_per_byte = nats / math.log(2) / nbytes
    assert bits_per_byte <= 2.0, bits_per_byte  # a model that knows nothing: 8


def test_demo_model_is_small() -> None:
    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size <= 30 * 2**20


def test_completions_are_python_and_the_same_with_the_cache_on_and_off(hf) -> None:
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    cached = LLM(None, dtype="float32", num_blocks=64)
    uncached = LLM(None, dtype="float32", num_blocks=64, enable_prefix_caching=False)
    for prompt in PROMPTS:
        first = cached.generate([prompt], params)[0]
        again = cached.generate([prompt], params)[0]  # its prompt blocks now come from the cache
        cold = uncached.generate([prompt], params)[0]
        assert again.usage.cached_tokens > 0 or len(first.prompt_token_ids) <= 16
        assert first.token_ids == again.token_ids == cold.token_ids
        ids = torch.tensor([first.prompt_token_ids])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=40,
                          min_new_tokens=40, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert first.token_ids == ref
        text = first.text
        assert "\ufffd" not in text
        # recognisable Python: indented lines, and the keywords a function body is made of
        assert "\n    " in text and any(k in text for k in ("return", "if ", "self.", "for ", "= ")), text


def test_generate_command_writes_the_same_python_with_and_without_the_cache(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "promptcache.cli", "generate", "def fibonacci(n):", "--max-tokens", "24"]
    on = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    off = subprocess.run(cmd + ["--no-prefix-cache"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert on.stdout == off.stdout and "\n    " in on.stdout and "\ufffd" not in on.stdout, on.stdout
