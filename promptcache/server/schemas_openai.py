"""Request bodies of the OpenAI dialect (Chat Completions, Completions).

Fields we do not act on (``user``, ``metadata``, ``store``, ``response_format`` ...) are accepted and
ignored, as the official SDKs send them; fields whose silent loss would change the result (``n > 1``,
penalties, ``echo``) are accepted by the schema and refused with a 400 by the handler.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import ConfigDict, Field

from promptcache.engine.api import MAX_TTL_S
from promptcache.server.retention import TTL_PATTERN
from promptcache.server.schemas_base import (
    JsonInt,
    NonEmptyStr,
    NonNegativeInt,
    NumLogprobs,
    PositiveInt,
    text_required,
)
from promptcache.server.schemas_base import RequestBody as _Body

TokenIds = Annotated[list[NonNegativeInt], Field(min_length=1)]
T = TypeVar("T")
# a batch of prompts is a 400 (one prompt per request): a list of one
OnePrompt = Annotated[list[T], Field(min_length=1, json_schema_extra={"maxItems": 1})]


class StreamOptions(_Body):
    include_usage: bool = False


class PromptCacheOptions(_Body):
    mode: Literal["implicit", "explicit"] = "implicit"
    ttl: Annotated[str, Field(pattern=TTL_PATTERN)] | Annotated[float, Field(ge=0, le=MAX_TTL_S)] | None = Field(
        default=None, description="minimum lifetime after each use, at most 30 days: '30m', '1h', '24h', 300")
    prewarm: bool = Field(default=False, description="only store the prompt in the cache (no generation)")
    comparison_response_id: str | None = None


class PromptCacheBreakpoint(_Body):
    mode: Literal["explicit"] = "explicit"


class ContentPart(_Body):
    model_config = ConfigDict(extra="allow", json_schema_extra=text_required)
    type: str = Field(json_schema_extra={"enum": ["text", "input_text"]})  # others: a 400 naming them
    text: str | None = None
    prompt_cache_breakpoint: PromptCacheBreakpoint | None = None


class ChatMessage(_Body):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class JsonSchemaFormat(_Body):
    model_config = ConfigDict(populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = Field(default=None, description="accepted; the output always matches the schema "
                                "(constrained decoding)")


def _format_schema(schema: dict[str, Any]) -> None:
    schema["if"] = {"properties": {"type": {"const": "json_schema"}}}
    schema["then"] = {"required": ["type", "json_schema"], "properties": {"json_schema": {"type": "object"}}}


class ResponseFormat(_Body):
    model_config = ConfigDict(json_schema_extra=_format_schema)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


BiasValue = Annotated[float, Field(ge=-100.0, le=100.0)]


ADVISORY = "advisory: accepted, no effect on this server"


class OpenAIRequestBase(_Body):
    # a field of neither the schema nor the advisory list is a 400 naming it (never silently ignored)
    model_config = ConfigDict(extra="forbid")
    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, le=1.0, json_schema_extra={"exclusiveMinimum": 0.0})  # (0, 1]
    top_k: JsonInt | None = Field(default=None, description="extension (vLLM): keep the k most likely tokens")
    seed: JsonInt | None = None
    stop: NonEmptyStr | list[NonEmptyStr] | None = None
    n: PositiveInt | None = Field(default=1, json_schema_extra={"maximum": 8},  # MAX_CHOICES
                                  description="choices (at most 8; completions: not with stream=true)")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # accepted by OpenAI in [-2, 2]; this server serves only 0 (others are a 400 naming the field)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0,
                                            json_schema_extra={"minimum": 0.0, "maximum": 0.0})
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0,
                                           json_schema_extra={"minimum": 0.0, "maximum": 0.0})
    ignore_eos: bool = Field(default=False, description="extension (vLLM): generate past end-of-sequence")
    return_token_ids: bool | None = Field(default=None, description="extension (vLLM): the prompt's ids "
                                          "(prompt_token_ids) and each choice's generated ids (token_ids; "
                                          "streams: each chunk's)")
    return_tokens: bool | None = Field(default=None, description="extension (llama.cpp): the same as "
                                       "return_token_ids")
    prompt_cache_key: str | None = Field(default=None, description="routing key: with --replicas, a hot prefix + "
                                         "key spreads to a second replica")
    user: str | None = Field(default=None, description=ADVISORY + " (tenants come from API keys)")
    safety_identifier: str | None = Field(default=None, description=ADVISORY)
    metadata: dict[str, Any] | None = Field(default=None, description=ADVISORY)
    store: bool | None = Field(default=None, description=ADVISORY + " (nothing is stored)")
    service_tier: str | None = Field(default=None, description=ADVISORY + " (one tier)")
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    logit_bias: dict[str, BiasValue] | None = Field(default=None, description="token id (as a string) -> bias "
                                                    "added to its logit; -100 bans it, 100 all but forces it",
                                                    json_schema_extra={"propertyNames": {"pattern": "^[0-9]+$"}})
    response_format: ResponseFormat | None = Field(default=None, description="json_object or json_schema: the "
                                                   "output is constrained to it (llguidance)")


class FunctionDefinition(_Body):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = Field(default=None, description="accepted; forced calls always match the schema")


class FunctionTool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(OpenAIRequestBase):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: NonNegativeInt | None = None
    max_completion_tokens: NonNegativeInt | None = None
    logprobs: bool | None = False
    top_logprobs: NumLogprobs | None = None
    tools: list[FunctionTool] | None = None
    parallel_tool_calls: bool | None = Field(default=None, description=ADVISORY + " (a forced call is one call)")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None


class CompletionRequest(OpenAIRequestBase):
    # token ids' maximum (the vocabulary) is written into the served spec by openapi.fix_openapi
    prompt: NonEmptyStr | OnePrompt[NonEmptyStr] | TokenIds | OnePrompt[TokenIds]
    max_tokens: NonNegativeInt | None = 16
    logprobs: NumLogprobs | None = None
    echo: bool | None = Field(default=False, json_schema_extra={"enum": [False, None]})  # echo is a 400
    suffix: str | None = Field(default=None, json_schema_extra={"maxLength": 0})  # a suffix is a 400
    best_of: PositiveInt | None = Field(default=None, json_schema_extra={"maximum": 1})  # best_of > 1 is a 400
