"""Tool-call formats: each family's parser, and its forcing grammar accepting exactly its format."""

from __future__ import annotations

import json

import pytest

from promptcache.engine.sampling import StructuredOutput
from promptcache.server.tools import FORMATS, Tool, detect

TOOLS = [Tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                              "additionalProperties": False}),
         Tool("get_time", {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"],
                           "additionalProperties": False})]


@pytest.mark.parametrize(("family", "text", "content", "calls"), [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
               '\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
     "Let me check.", [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]),
    ("hermes", "no calls here", "no calls here", []),
    ("hermes", '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>',  # unknown tools stay text
     '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>', []),
    ("llama3", '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}', "",
     [("get_time", {"zone": "UTC"})]),
    ("llama3", 'The answer is {"a": 1}', 'The answer is {"a": 1}', []),
    ("mistral", 'ok [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}]', "ok",
     [("get_weather", {"city": "Rome"})]),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}]', "",
     [("get_weather", {"city": "Oslo"})]),  # arguments as a JSON string
])
def test_parsers(family: str, text: str, content: str, calls: list) -> None:
    assert FORMATS[family].parse(text, TOOLS) == (content, calls)


def test_detect_family_from_the_template() -> None:
    assert detect("... [TOOL_CALLS] ...").name == "mistral"
    assert detect("... <|python_tag|> ... ipython ...").name == "llama3"
    assert detect("<tool_call>").name == "hermes" and detect(None).name == "hermes"


@pytest.mark.parametrize("family", sorted(FORMATS))
def test_forcing_grammars_accept_their_own_format_only(family: str) -> None:
    from promptcache.engine.structured import Grammars
    from promptcache.model.shapes import TOKENIZER_DIR

    grammars = Grammars(str(TOKENIZER_DIR / "tokenizer.json"), 4096, [1, 2])
    fmt = FORMATS[family]
    args_key = "parameters" if family == "llama3" else "arguments"
    call = json.dumps({"name": "get_time", args_key: {"zone": "CET"}})
    good = {"hermes": f"<tool_call>\n{call}\n</tool_call>", "llama3": call, "mistral": f"[TOOL_CALLS] [{call}]"}[family]
    tok = grammars._lltokenizer()
    matcher = grammars.matcher(StructuredOutput("lark", fmt.grammar(TOOLS)))
    ids = tok.tokenize_str(good)
    assert matcher._m.validate_tokens(ids) == len(ids)  # the format as the template renders it back
    assert fmt.parse(good, TOOLS)[1] == [("get_time", {"zone": "CET"})]
    bad = good.replace('"zone"', '"city"')  # get_time's schema has no city
    fresh = grammars.matcher(StructuredOutput("lark", fmt.grammar(TOOLS)))
    assert fresh._m.validate_tokens(tok.tokenize_str(bad)) < len(tok.tokenize_str(bad))


def test_deeply_nested_output_is_text_not_a_crash() -> None:
    text = "<tool_call>\n" + "[" * 5000 + "\n</tool_call>"
    assert FORMATS["hermes"].parse(text, TOOLS) == (text, [])
    assert FORMATS["mistral"].parse("[TOOL_CALLS] " + "[" * 5000, TOOLS)[1] == []
