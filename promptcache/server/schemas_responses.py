"""Request body of OpenAI's Responses API (``POST /v1/responses``).

``input`` is a string or a list of items: messages (``role`` + text content), the model's earlier
``function_call`` items and the client's ``function_call_output`` items. Fields whose silent loss
would change the result (reasoning effort, background mode, built-in tools, truncation ``auto``)
are refused by the handler with a 400 naming them; advisory ones are accepted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from promptcache.server.schemas_base import JsonInt, NonEmptyStr, NonNegativeInt, NumLogprobs, text_required
from promptcache.server.schemas_base import RequestBody as _Body
from promptcache.server.schemas_openai import ADVISORY, PromptCacheOptions


class InputText(_Body):
    model_config = ConfigDict(extra="allow", json_schema_extra=text_required)
    type: str = Field(json_schema_extra={"enum": ["input_text", "output_text", "text"]})  # others: a 400
    text: str | None = None


class InputItem(_Body):
    """One ``input`` item: a message (``role``, ``content``), a ``function_call`` or a
    ``function_call_output``. Which fields an item needs depends on its type (checked by the
    handler, naming the item)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["message", "function_call", "function_call_output"] | None = None
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[InputText] | None = None
    id: str | None = None
    status: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputText] | None = None


def _name_required(schema: dict[str, Any]) -> None:
    schema["required"] = ["type", "name"]  # the spec says so; a built-in tool gets a 400 naming its type
    schema["properties"]["name"] = {"type": "string", "title": "Name"}


def _schema_required(schema: dict[str, Any]) -> None:
    schema["if"] = {"properties": {"type": {"const": "json_schema"}}}
    schema["then"] = {"required": ["type", "schema"], "properties": {"schema": {"type": "object"}}}


class FunctionToolDef(_Body):
    model_config = ConfigDict(extra="allow", json_schema_extra=_name_required)
    type: str = Field(json_schema_extra={"enum": ["function"]})  # built-in tools: a 400 naming them
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(_Body):
    type: Literal["function"]
    name: str


class TextFormat(_Body):
    model_config = ConfigDict(populate_by_name=True, json_schema_extra=_schema_required)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(_Body):
    model_config = ConfigDict(extra="forbid")
    format: TextFormat | None = None
    verbosity: str | None = Field(default=None, description=ADVISORY)


class Reasoning(_Body):
    model_config = ConfigDict(extra="allow")
    effort: str | None = Field(default=None, json_schema_extra={"enum": [None, "none"]})  # others: a 400
    summary: str | None = None


class ResponsesStreamOptions(_Body):
    include_obfuscation: bool | None = Field(default=None, description=ADVISORY)


class ResponseCreateRequest(_Body):
    model_config = ConfigDict(extra="forbid")
    model: str
    input: NonEmptyStr | Annotated[list[InputItem], Field(min_length=1)] = Field(
        description="text, or a list of messages and function-call items")
    instructions: str | None = None
    previous_response_id: str | None = Field(default=None, description="continue a stored response (per tenant)")
    store: bool | None = Field(default=True, description="keep the response for previous_response_id and GET")
    stream: bool | None = False
    stream_options: ResponsesStreamOptions | None = Field(default=None, description=ADVISORY)
    max_output_tokens: NonNegativeInt | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, le=1.0, json_schema_extra={"exclusiveMinimum": 0.0})
    top_k: JsonInt | None = Field(default=None, description="extension (vLLM): keep the k most likely tokens")
    seed: JsonInt | None = Field(default=None, description="extension: the sampler's seed")
    top_logprobs: NumLogprobs | None = Field(default=None, json_schema_extra={"maximum": 0})  # > 0: a 400
    tools: list[FunctionToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = Field(default=None, description=ADVISORY + " (a forced call is one call)")
    text: TextConfig | None = None
    reasoning: Reasoning | None = Field(default=None, description="only effort null/'none' (no reasoning here)")
    truncation: Literal["disabled", "auto"] | None = Field(default=None, description="'disabled' only",
                                                           json_schema_extra={"enum": ["disabled", None]})
    background: bool | None = Field(default=None, description="false only", json_schema_extra={"enum": [False, None]})
    include: list[str] | None = Field(default=None, description=ADVISORY)
    max_tool_calls: NonNegativeInt | None = Field(default=None, description=ADVISORY)
    prompt_cache_key: str | None = Field(default=None, description="routing key: with --replicas, a hot prefix + "
                                         "key spreads to a second replica")
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    user: str | None = Field(default=None, description=ADVISORY + " (tenants come from API keys)")
    safety_identifier: str | None = Field(default=None, description=ADVISORY)
    metadata: dict[str, str] | None = Field(default=None, description="stored and returned with the response")
    service_tier: str | None = Field(default=None, description=ADVISORY + " (one tier)")
    ignore_eos: bool = Field(default=False, description="extension (vLLM): generate past end-of-sequence")
