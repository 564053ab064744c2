"""Request bodies of the Anthropic dialect (Messages, count_tokens)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from promptcache.server.schemas_base import NonEmptyStr, NonNegativeInt, text_required
from promptcache.server.schemas_base import RequestBody as _Body


class CacheControl(_Body):
    type: Literal["ephemeral"] = "ephemeral"
    ttl: Literal["5m", "1h"] = "5m"


def _text_block_schema(schema: dict[str, Any]) -> None:
    text_required(schema)
    schema["if"] = {"required": ["cache_control"], "properties": {"cache_control": {"type": "object"}}}
    schema["then"] = {"properties": {"text": {"minLength": 1}}}  # EMPTY_BLOCK_MESSAGE otherwise


class TextBlock(_Body):
    """A system block: text only (another type is a 400 naming it)."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_text_block_schema)
    type: str = Field(json_schema_extra={"enum": ["text"]})
    text: str | None = None
    cache_control: CacheControl | None = None


_TEXT_ITEMS = {"type": "array", "items": {"type": "object", "required": ["type", "text"], "properties": {
    "type": {"const": "text"}, "text": {"type": "string"}}}}


def _block_schema(schema: dict[str, Any]) -> None:
    props = schema["properties"]
    props["type"] = {"type": "string", "enum": ["text", "tool_use", "tool_result"], "title": "Type"}
    props["text"] = {"type": "string", "title": "Text"}
    props["content"] = {"title": "Content"}  # constrained for tool_result blocks below
    schema["allOf"] = [
        {"if": {"properties": {"type": {"const": "text"}}}, "then": {"required": ["text"]}},
        {"if": {"properties": {"type": {"const": "tool_use"}}},
         "then": {"required": ["id", "name", "input"], "properties": {
             "id": {"type": "string"}, "name": {"type": "string"}, "input": {"type": "object"},
             "cache_control": {"type": "null"}}}},
        {"if": {"properties": {"type": {"const": "tool_result"}}},
         "then": {"required": ["tool_use_id"], "properties": {
             "tool_use_id": {"type": "string"},
             "content": {"anyOf": [{"type": "string"}, _TEXT_ITEMS, {"type": "null"}]}}}},
        {"if": {"required": ["cache_control"], "properties": {"cache_control": {"type": "object"}}},
         "then": {"properties": {"text": {"minLength": 1}}}},  # EMPTY_BLOCK_MESSAGE otherwise
    ]


class ContentBlock(_Body):
    """A message block: ``text``, an assistant's ``tool_use`` or a user's ``tool_result`` (other
    types are a 400 naming them)."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_block_schema)
    type: str
    text: str | None = None
    cache_control: CacheControl | None = None
    id: str | None = None  # tool_use
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None  # tool_result
    content: str | list[TextBlock] | None = None  # tool_result: its text
    is_error: bool | None = None


class Message(_Body):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class Tool(_Body):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    cache_control: CacheControl | None = None


def _tool_choice_schema(schema: dict[str, Any]) -> None:
    schema["if"] = {"properties": {"type": {"const": "tool"}}}
    schema["then"] = {"required": ["type", "name"], "properties": {"name": {"type": "string"}}}


class ToolChoice(_Body):
    model_config = ConfigDict(json_schema_extra=_tool_choice_schema)
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None  # for type "tool"
    disable_parallel_tool_use: bool | None = Field(default=None, description="accepted; one call per turn here")

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if self.type == "tool" and self.name is None:
            raise ValueError('type "tool" needs the name of the tool')
        return self


class CountTokensRequest(_Body):
    # a field of neither the schema nor the advisory list is a 400 naming it (never silently ignored)
    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    cache_control: CacheControl | None = Field(
        default=None, description="automatic caching: a breakpoint on the last block of the last message"
    )


class Diagnostics(_Body):
    previous_message_id: str | None = Field(default=None, description="the id of an earlier message of this "
                                            "API key's tenant: the response's diagnostics say why this one missed")


class MessagesRequest(CountTokensRequest):
    max_tokens: NonNegativeInt = Field(description="0 pre-warms the cache and returns no content")
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, le=1.0, json_schema_extra={"exclusiveMinimum": 0.0})  # (0, 1]
    top_k: NonNegativeInt | None = None
    stop_sequences: list[NonEmptyStr] | None = None
    ignore_eos: bool = Field(default=False, description="extension (vLLM): generate past end-of-sequence")
    stream: bool | None = False
    metadata: dict[str, Any] | None = Field(default=None, description="advisory: accepted, no effect on this server")
    service_tier: str | None = Field(default=None, description="advisory: accepted, no effect on this server")
    diagnostics: Diagnostics | None = None
