"""Constrained decoding (llguidance): every output of a random model matches its grammar — alone,
in a batch with free requests, greedy and seeded — and logit_bias moves greedy choices."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from promptcache import LLM, SamplingParams
from promptcache.engine.request import RequestSpec
from promptcache.engine.sampling import StructuredOutput

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "mood": {"enum": ["calm", "busy", "tired"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    },
    "required": ["name", "age", "mood", "tags"],
    "additionalProperties": False,
}


def valid(obj: Any) -> bool:
    """SCHEMA, checked by hand (no validator library needed for one schema)."""
    return (isinstance(obj, dict) and set(obj) == {"name", "age", "mood", "tags"}
            and isinstance(obj["name"], str) and len(obj["name"]) <= 8
            and isinstance(obj["age"], int) and not isinstance(obj["age"], bool) and 0 <= obj["age"] <= 150
            and obj["mood"] in ("calm", "busy", "tired")
            and isinstance(obj["tags"], list) and len(obj["tags"]) <= 3
            and all(isinstance(t, str) and len(t) <= 5 for t in obj["tags"]))


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("random:tiny", dtype="float32", num_blocks=512)


def _run(llm: LLM, specs: list[RequestSpec]) -> dict[str, Any]:
    engine = llm.engine
    for spec in specs:
        engine.add_request(spec)
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
    engine.check_integrity()
    return outs


def test_json_schema_outputs_always_validate_alone_and_batched(llm: LLM) -> None:
    prompt = llm.engine.tokenizer.encode("Describe a person as JSON:")
    structured = StructuredOutput.json_schema(SCHEMA)
    def constrained(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=120, temperature=1.0, seed=seed, structured=structured)

    alone = _run(llm, [RequestSpec(f"s{i}", prompt, constrained(i)) for i in range(20)])
    batch = [RequestSpec(f"b{i}", prompt, constrained(i)) for i in range(10)]
    batch += [RequestSpec(f"free{i}", prompt, SamplingParams(max_tokens=30, temperature=1.0, seed=i))
              for i in range(10)]
    mixed = _run(llm, batch)
    for rid, out in {**alone, **mixed}.items():
        if rid.startswith("free"):
            continue
        assert out.finish_reason == "stop", (rid, out.text)  # the grammar completed
        assert valid(json.loads(out.text)), (rid, out.text)
    # a seed fixes a constrained sample whatever shares the batch
    assert [alone[f"s{i}"].text for i in range(10)] == [mixed[f"b{i}"].text for i in range(10)]
    free_texts = [mixed[f"free{i}"].text for i in range(10)]
    assert sum(t.lstrip().startswith("{") for t in free_texts) < 10  # unconstrained rows stay free


def test_regex_and_json_object_and_greedy(llm: LLM) -> None:
    prompt = llm.engine.tokenizer.encode("Give a date:")
    pattern = r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"
    date = _run(llm, [RequestSpec("re", prompt, SamplingParams(
        max_tokens=20, temperature=0.0, structured=StructuredOutput("regex", pattern)))])
    assert re.fullmatch(pattern, date["re"].text), date["re"].text
    obj = _run(llm, [RequestSpec("obj", prompt, SamplingParams(
        max_tokens=60, temperature=0.7, seed=3, structured=StructuredOutput("json_object")))])["obj"]
    if obj.finish_reason == "stop":  # an open-ended object may run out of tokens; a finished one parses
        assert isinstance(json.loads(obj.text), dict)
    assert obj.text.startswith("{")


def test_bad_grammars_are_refused_up_front(llm: LLM) -> None:
    prompt = llm.engine.tokenizer.encode("x")
    with pytest.raises(ValueError, match="invalid json_schema"):
        llm.engine.add_request(RequestSpec("bad", prompt, SamplingParams(
            structured=StructuredOutput("json_schema", json.dumps({"type": "objectx"})))))
    with pytest.raises(ValueError, match="invalid regex"):
        llm.engine.add_request(RequestSpec("bad2", prompt, SamplingParams(structured=StructuredOutput("regex", "(("))))
    assert not llm.engine.has_unfinished_requests()


def test_logit_bias_bans_and_forces_tokens(llm: LLM) -> None:
    prompt = llm.engine.tokenizer.encode("The quick brown fox")
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    plain = llm.generate([prompt], greedy)[0].token_ids
    banned = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                                                   logit_bias={plain[0]: -100.0}))[0].token_ids
    assert plain[0] not in banned
    forced = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                                                   logit_bias={77: 100.0}))[0].token_ids
    assert forced == [77] * 6
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={5: 101.0})
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        llm.generate([prompt], SamplingParams(logit_bias={10**6: 1.0}))
