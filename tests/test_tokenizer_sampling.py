"""Tokenizer, chat template, incremental detokenisation, sampling and stop conditions."""

from __future__ import annotations

import pytest
import torch

from promptcache import LLM, SamplingParams
from promptcache.engine.request import RequestSpec
from promptcache.model.shapes import DEFAULT_MODEL_DIR
from promptcache.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("random:tiny", dtype="float32", num_blocks=128)


def test_chat_template_is_byte_stable(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = tok.render_chat(msgs)
    assert (
        text
        == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(msgs) == tok.apply_chat_template([dict(m) for m in msgs])
    assert tok.apply_chat_template(msgs)[0] == tok.token_to_id("<|im_start|>")


def test_detokenizer_never_splits_utf8(tok):
    text = "naïve café — 日本語 🙂 done"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) + detok.flush() == text
    assert all("\ufffd" not in p for p in pieces)


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    a = llm.generate("hello there", params)[0]
    b = llm.generate(["other prompt", "hello there", "x y z"], params)[1]
    assert a.token_ids == b.token_ids
    c = llm.generate("hello there", SamplingParams(max_tokens=12, temperature=1.0, seed=8, ignore_eos=True))[
        0
    ]
    assert c.token_ids != a.token_ids


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate("abc", SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    k1 = llm.generate("abc", SamplingParams(max_tokens=6, temperature=2.0, top_k=1, seed=1, ignore_eos=True))[
        0
    ]
    assert greedy.token_ids == k1.token_ids


def test_stop_token_ids_and_stop_strings(llm):
    base = llm.generate("abc", SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    stop_id = base.token_ids[3]
    first = base.token_ids.index(stop_id)
    out = llm.generate("abc", SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[stop_id]))[0]
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    # a stop string taken from the middle of the greedy text cuts the output right before it
    stop = base.text[len(base.text) // 2 : len(base.text) // 2 + 3]
    cut = llm.generate("abc", SamplingParams(max_tokens=10, temperature=0.0, stop=[stop], ignore_eos=True))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == base.text[: base.text.index(stop)]


def test_eos_from_generation_config_stops_unless_ignored(llm):
    eos = llm.engine.eos_token_ids
    assert (
        llm.tokenizer.token_to_id("<|im_end|>") in eos and llm.tokenizer.token_to_id("<|endoftext|>") in eos
    )
    # the demo model never picks those; make its 4th greedy token an EOS id and watch it stop there
    free = llm.generate("abc", SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    fourth = free.token_ids[3]
    assert fourth not in free.token_ids[:3]
    saved = set(eos)
    try:
        llm.engine.eos_token_ids.add(fourth)
        stopped = llm.generate("abc", SamplingParams(max_tokens=8, temperature=0.0))[0]
        ignored = llm.generate("abc", SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    finally:
        llm.engine.eos_token_ids.clear()
        llm.engine.eos_token_ids.update(saved)
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:4]
    assert stopped.usage.completion_tokens == 4 and stopped.text == llm.tokenizer.decode(free.token_ids[:3])
    assert ignored.finish_reason == "length" and ignored.token_ids == free.token_ids


def test_streamed_deltas_add_up_to_text(llm):
    engine = llm.engine
    engine.add_request(RequestSpec(
        "s",
        llm.tokenizer.encode("stream me"),
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)))
    deltas, last = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.new_text)
            last = out
    assert last is not None and last.finished and "".join(deltas) == last.text
    assert last.usage.completion_tokens == 20 and len(last.token_ids) == 20


def test_invalid_sampling_values_raise():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_tokens=-1), dict(logprobs=50), dict(stop=[""])):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_logprobs_are_consistent(llm):
    out = llm.generate("abc", SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, ignore_eos=True))[0]
    assert len(out.logprobs) == 4
    for tok_id, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == tok_id and lp.top[0][0] == tok_id and lp.logprob == lp.top[0][1] <= 0
        assert [x[1] for x in lp.top] == sorted((x[1] for x in lp.top), reverse=True)


def test_chat_api(llm):
    out = llm.chat(
        [{"role": "user", "content": "hi"}], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    )[0]
    assert out.usage.prompt_tokens == len(
        llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    )


def test_extreme_but_valid_values_never_crash(llm):
    tiny_t = llm.generate("abc", SamplingParams(max_tokens=5, temperature=1e-300, seed=2**70, ignore_eos=True))[0]
    greedy = llm.generate("abc", SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert tiny_t.token_ids == greedy.token_ids
    a = llm.generate("abc", SamplingParams(max_tokens=5, temperature=1.0, seed=-(2**80), ignore_eos=True))[0]
    b = llm.generate("abc", SamplingParams(max_tokens=5, temperature=1.0, seed=-(2**80), ignore_eos=True))[0]
    assert a.token_ids == b.token_ids


def test_outputs_are_snapshots(llm):
    engine = llm.engine
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=1, ignore_eos=True)
    engine.add_request(RequestSpec("snap", [5, 6, 7], params))
    seen = []
    while engine.has_unfinished_requests():
        seen.extend(engine.step())
    assert [len(o.logprobs) for o in seen] == [1, 2, 3, 4]
    assert [o.usage.completion_tokens for o in seen] == [1, 2, 3, 4]


def test_greedy_takes_the_first_of_tied_maxima():
    """Greedy rows pick the first maximal logit (ties are common in 16-bit logits), a NaN row its
    first NaN (as argmax does), and the pick does not depend on the other rows of the batch."""
    from promptcache.engine.sampler import Sampler

    logits = torch.randn(5, 49152, generator=torch.Generator().manual_seed(0))
    logits[0, [7, 300, 40000]] = 50.0
    logits[1, :] = 1.0
    logits[2, [11, 12]] = float("nan")
    logits[3, :] = float("-inf")
    logits[3, 49151] = 0.0
    params = [SamplingParams(temperature=0.0)] * 5
    tokens, _ = Sampler().sample(logits, [f"r{i}" for i in range(5)], params)
    assert tokens[:4] == [7, 0, 11, 49151] and tokens[4] == int(logits[4].argmax())
    alone, _ = Sampler().sample(logits[:1], ["r0"], params[:1])
    assert alone == tokens[:1]
