"""Tool calls: how a chat template's family writes them, parsing them out of the model's output,
and the grammar that forces one (``tool_choice`` required / a named function / ``any`` / ``tool``).

Families, detected from the chat template's text:

- ``hermes`` (Hermes, Qwen2.5/3, the embedded demo model): ``<tool_call>\\n{"name": ..., "arguments":
  {...}}\\n</tool_call>``, one block per call; text before the first block is content.
- ``llama3``: the output is one JSON object ``{"name": ..., "parameters": {...}}`` (optionally after
  ``<|python_tag|>``).
- ``mistral``: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]``.

A template of none of these gets ``hermes`` (its tags are plain text to any tokenizer).
Forced calls are decoded under a Lark grammar whose arguments are the tool's JSON schema
(llguidance's ``%json``), so they always parse and validate.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from promptcache.engine.api import StructuredOutput

# A forced call is generated in exactly the JSON the template renders it back in (json.dumps'
# separators, no other whitespace): the next turn, which re-sends the call, reuses its tokens too.
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = ""

    @classmethod
    def new(cls, name: str, arguments: dict[str, Any], prefix: str) -> ToolCall:
        return cls(name, arguments, f"{prefix}{uuid.uuid4().hex[:24]}")


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict[str, Any]  # JSON schema of the arguments


def _objects(text: str) -> list[tuple[int, int, Any]]:
    """Every top-level JSON value in ``text`` that starts with ``{`` or ``[``: (start, end, value)."""
    decoder = json.JSONDecoder()
    found, i = [], 0
    while i < len(text):
        if text[i] in "{[":
            try:
                value, end = decoder.raw_decode(text, i)
            except (ValueError, RecursionError):  # not JSON, or nested past the decoder's stack
                i += 1
                continue
            found.append((i, end, value))
            i = end
        else:
            i += 1
    return found


def _call(obj: Any, args_key: str, known: set[str]) -> tuple[str, dict[str, Any]] | None:
    if isinstance(obj, dict) and isinstance(obj.get("name"), str) and obj["name"] in known:
        args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if isinstance(args, dict):
            return obj["name"], args
    return None


class ToolFormat:
    name = "hermes"
    start = "<tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)

    def parse(self, text: str, tools: list[Tool]) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
        """(content before the calls, [(name, arguments)]); calls to unknown tools are left as text."""
        known = {t.name for t in tools}
        calls = []
        first = None
        for m in self._block.finditer(text):
            parsed = _call(_first_json(m.group(1)), "arguments", known)
            if parsed is not None:
                calls.append(parsed)
                first = m.start() if first is None else first
        if not calls:
            return text, []
        return text[:first].strip(), calls

    def grammar(self, tools: list[Tool]) -> str:
        return (f'start: "{_lark(self.start)}\\n" call "\\n</tool_call>"\n'
                f"call: %json {json.dumps(_choice_schema(tools, 'arguments'))}")


class Llama3Format(ToolFormat):
    name = "llama3"
    start = "{"

    def parse(self, text: str, tools: list[Tool]) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
        body = text.removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, []
        parsed = _call(_first_json(body), "parameters", {t.name for t in tools})
        return ("", [parsed]) if parsed is not None else (text, [])

    def grammar(self, tools: list[Tool]) -> str:
        return f"start: call\ncall: %json {json.dumps(_choice_schema(tools, 'parameters'))}"


class MistralFormat(ToolFormat):
    name = "mistral"
    start = "[TOOL_CALLS]"

    def parse(self, text: str, tools: list[Tool]) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
        idx = text.find(self.start)
        if idx < 0:
            return text, []
        value = _first_json(text[idx + len(self.start):])
        items = value if isinstance(value, list) else [value]
        known = {t.name for t in tools}
        calls = [c for c in (_call(item, "arguments", known) for item in items) if c is not None]
        return (text[:idx].strip(), calls) if calls else (text, [])

    def grammar(self, tools: list[Tool]) -> str:
        array = {"type": "array", "items": _choice_schema(tools, "arguments"), "minItems": 1, "maxItems": 1,
                 "x-guidance": COMPACT}
        return f'start: "{_lark(self.start)} " calls\ncalls: %json {json.dumps(array)}'


@dataclass(frozen=True)
class ToolPlan:
    """A request's tools: the family's format and whether calls are parsed from the output
    (``tool_choice`` other than ``none``); ``id_prefix`` is the dialect's (``call_``, ``toolu_``)."""

    tools: list[Tool]
    format: ToolFormat
    parse: bool
    id_prefix: str = "call_"

    def force(self, name: str | None = None) -> StructuredOutput | None:
        """The grammar that forces a call: to any of the tools, or to ``name`` (None: no such tool)."""
        tools = self.tools if name is None else [t for t in self.tools if t.name == name]
        return StructuredOutput("lark", self.format.grammar(tools)) if tools else None

    def split(self, text: str) -> tuple[str, list[ToolCall]]:
        if not self.parse:
            return text, []
        content, calls = self.format.parse(text, self.tools)
        return content, [ToolCall.new(name, args, self.id_prefix) for name, args in calls]


FORMATS: dict[str, ToolFormat] = {f.name: f for f in (ToolFormat(), Llama3Format(), MistralFormat())}


def detect(template: str | None) -> ToolFormat:
    t = template or ""
    if "[TOOL_CALLS]" in t:
        return FORMATS["mistral"]
    if "<|python_tag|>" in t or "ipython" in t:
        return FORMATS["llama3"]
    return FORMATS["hermes"]


def _first_json(text: str) -> Any:
    found = _objects(text)
    return found[0][2] if found else None


def _lark(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def _choice_schema(tools: list[Tool], args_key: str) -> dict[str, Any]:
    options = [{"type": "object",
                "properties": {"name": {"const": t.name}, args_key: t.parameters or {"type": "object"}},
                "required": ["name", args_key], "additionalProperties": False} for t in tools]
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"oneOf": options}
    return {**schema, "x-guidance": COMPACT}
