"""Request bodies of the Anthropic dialect (Messages, count_tokens)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from promptcache.server.schemas_base import JsonInt
from promptcache.server.schemas_base import RequestBody as _Body


class CacheControl(_Body):
    type: Literal["ephemeral"] = "ephemeral"
    ttl: Literal["5m", "1h"] = "5m"


class ContentBlock(_Body):
    """A content block; only ``text`` blocks are rendered (others are refused with a 400)."""

    model_config = ConfigDict(extra="allow")
    # the spec says what is served; another type is a 400 naming it (not a schema error)
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


class MessagesRequest(CountTokensRequest):
    max_tokens: JsonInt = Field(ge=0, description="0 pre-warms the cache and returns no content")
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, le=1.0, json_schema_extra={"exclusiveMinimum": 0.0})  # (0, 1]
    top_k: JsonInt | None = Field(default=None, ge=0)
    stop_sequences: list[str] | None = None
    ignore_eos: bool = Field(default=False, description="extension (vLLM): generate past end-of-sequence")
    stream: bool | None = False
    metadata: dict[str, Any] | None = None
