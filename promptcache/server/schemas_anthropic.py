"""Request bodies of the Anthropic dialect (Messages, count_tokens)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from promptcache.server.schemas_base import NonEmptyStr, NonNegativeInt, text_required
from promptcache.server.schemas_base import RequestBody as _Body


class CacheControl(_Body):
    type: Literal["ephemeral"] = "ephemeral"
    ttl: Literal["5m", "1h"] = "5m"


def _block_schema(schema: dict[str, Any]) -> None:
    text_required(schema)
    schema["if"] = {"required": ["cache_control"], "properties": {"cache_control": {"type": "object"}}}
    schema["then"] = {"properties": {"text": {"minLength": 1}}}  # EMPTY_BLOCK_MESSAGE otherwise


class ContentBlock(_Body):
    """A content block; only ``text`` blocks are rendered (others are refused with a 400)."""

    # the spec says what is served (text blocks with their text); another type is a 400 naming it
    model_config = ConfigDict(extra="allow", json_schema_extra=_block_schema)
    type: str = Field(json_schema_extra={"enum": ["text"]})
    text: str | None = None
    cache_control: CacheControl | None = None


class Message(_Body):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class Tool(_Body):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    cache_control: CacheControl | None = None


class CountTokensRequest(_Body):
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[ContentBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: dict[str, Any] | None = None
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
    metadata: dict[str, Any] | None = None
    diagnostics: Diagnostics | None = None
