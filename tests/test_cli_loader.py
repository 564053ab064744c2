"""Model sources (directory, hub id, random shape, embedded default) and the CLI around them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from promptcache import LLM, SamplingParams
from promptcache.model.loader import resolve_model_dir
from promptcache.model.shapes import DEFAULT_MODEL_DIR


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "promptcache.cli", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, **env},
    )


def test_make_model_writes_a_checkpoint_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "tiny"
    r = cli("make-model", "--shape", "tiny", "--out", str(out), "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    ours = LLM(str(out), dtype="float32", num_blocks=32)
    text = "def f(x):\n    return x"
    assert hf_tok(text)["input_ids"] == ours.tokenizer.encode(text)
    prompt = ours.tokenizer.encode(text)
    ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    got = ours.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert got.token_ids == ref[0, len(prompt):].tolist()
    msgs = [{"role": "user", "content": "hi"}]
    rendered = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert rendered == ours.tokenizer.render_chat(msgs)


def test_unreachable_hub_id_is_a_clear_error():
    r = cli("generate", "--model", "some-org/some-model", "hi", HF_HUB_OFFLINE="1")
    assert r.returncode == 2
    assert "some-org/some-model" in r.stderr and "--model DIR" in r.stderr


def test_bad_local_paths_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model_dir(str(tmp_path))
    with pytest.raises(ValueError, match="neither a checkpoint directory nor a hub id"):
        resolve_model_dir(str(tmp_path / "missing" / "deeper" / "path"))


def test_default_model_is_embedded_and_small():
    size = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.iterdir())
    assert size < 30 * 2**20
    r = cli("generate", "hello", "--max-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert "5 generated" in r.stderr


def test_version(capsys) -> None:
    import pytest as _pytest

    from promptcache.cli import main as cli_main

    with _pytest.raises(SystemExit) as e:
        cli_main(["--version"])
    assert e.value.code == 0
    from importlib.metadata import version

    assert capsys.readouterr().out.strip() == f"promptcache {version('promptcache')}"


def test_an_impossible_kv_budget_is_one_clear_line(capsys) -> None:
    from promptcache.cli import main as cli_main

    code = cli_main(["generate", "--model", "random:tiny", "--kv-cache-memory", "10TiB", "--max-tokens", "1", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("promptcache: error: --kv-cache-memory 10TiB asks for 10.0 TiB of KV cache;")
    assert "of memory (" in err[0] and "available)" in err[0]
    code = cli_main(["generate", "--model", "random:tiny", "--kv-cache-memory", "lots", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "invalid size 'lots'" in err[0]


def test_a_port_in_use_is_one_line_and_no_banner() -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "promptcache.cli", "serve", "--model", "random:tiny",
                            "--kv-cache-memory", "8MiB", "--port", str(port)], capture_output=True, text=True,
                           timeout=120)
    assert r.returncode == 2 and "serving" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert lines == [f"promptcache: error: cannot listen on 127.0.0.1:{port}: Address already in use (another "
                     "server is using it; pick another --port)"], r.stderr


def test_help_shows_every_default() -> None:
    """Every option of generate and serve that takes a value and has a default says which."""
    from promptcache.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices  # type: ignore[attr-defined]
    for name in ("generate", "serve", "make-model"):
        for action in subs[name]._actions:
            if action.option_strings and action.nargs != 0 and action.default not in (None, "==SUPPRESS==") \
                    and action.dest != "help":
                assert "(default: " in (action.help or ""), (name, action.option_strings)
