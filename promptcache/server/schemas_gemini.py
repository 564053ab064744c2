"""Request bodies of the Gemini dialect (generateContent, countTokens, cachedContents), in the
API's camelCase. Parts carry text, ``functionCall`` or ``functionResponse`` (other kinds — inline
data, files, code — are a 400 naming them); unknown fields are a 400 naming them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from promptcache.server.schemas_base import JsonInt, NonNegativeInt, PositiveInt
from promptcache.server.schemas_base import RequestBody as _Body

DURATION_PATTERN = r"^[0-9]+(\.[0-9]{1,9})?s$"  # google.protobuf.Duration in JSON: "300s", "1.5s"


class FunctionCall(_Body):
    name: str
    args: dict[str, Any] | None = None
    id: str | None = None


class FunctionResponse(_Body):
    name: str
    response: dict[str, Any] | None = None
    id: str | None = None


def _part_schema(schema: dict[str, Any]) -> None:
    # exactly one of the kinds served; others (inlineData, fileData, ...) are a 400 naming them
    schema["minProperties"] = 1
    schema["additionalProperties"] = False


class Part(_Body):
    model_config = ConfigDict(extra="allow", json_schema_extra=_part_schema)
    text: str | None = None
    functionCall: FunctionCall | None = None
    functionResponse: FunctionResponse | None = None
    thought: bool | None = None


class Content(_Body):
    role: Literal["user", "model", "function"] | None = None
    parts: list[Part] = Field(min_length=1)


class FunctionDeclaration(_Body):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="OpenAPI schema (types OBJECT, STRING...)")
    parametersJsonSchema: dict[str, Any] | None = None
    response: dict[str, Any] | None = None
    responseJsonSchema: dict[str, Any] | None = None
    behavior: str | None = None


class Tool(_Body):
    model_config = ConfigDict(extra="allow", json_schema_extra=lambda s: s.update(additionalProperties=False))
    functionDeclarations: list[FunctionDeclaration] | None = None


class FunctionCallingConfig(_Body):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["MODE_UNSPECIFIED", "AUTO", "ANY", "NONE", "VALIDATED"] | None = None
    allowedFunctionNames: list[str] | None = None


class ToolConfig(_Body):
    model_config = ConfigDict(extra="forbid")
    functionCallingConfig: FunctionCallingConfig | None = None


class ThinkingConfig(_Body):
    model_config = ConfigDict(extra="allow")
    thinkingBudget: JsonInt | None = Field(default=None, json_schema_extra={"enum": [0, None]})  # else a 400
    includeThoughts: bool | None = Field(default=None, json_schema_extra={"enum": [False, None]})


class GenerationConfig(_Body):
    model_config = ConfigDict(extra="forbid")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    topP: float | None = Field(default=None, le=1.0, json_schema_extra={"exclusiveMinimum": 0.0})
    topK: JsonInt | None = Field(default=None, ge=1)
    maxOutputTokens: NonNegativeInt | None = None
    stopSequences: list[str] | None = Field(default=None, max_length=5)
    candidateCount: PositiveInt | None = Field(default=None, json_schema_extra={"maximum": 1})  # > 1: a 400
    seed: JsonInt | None = None
    responseMimeType: Literal["text/plain", "application/json"] | None = None
    responseSchema: dict[str, Any] | None = Field(default=None, description="OpenAPI subset (types OBJECT...)")
    responseJsonSchema: dict[str, Any] | None = None
    presencePenalty: float | None = Field(default=None, json_schema_extra={"minimum": 0.0, "maximum": 0.0})
    frequencyPenalty: float | None = Field(default=None, json_schema_extra={"minimum": 0.0, "maximum": 0.0})
    thinkingConfig: ThinkingConfig | None = None
    responseModalities: list[Literal["TEXT"]] | None = None


class GenerateContentRequest(_Body):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(default=None, description="countTokens' generateContentRequest names it")
    contents: list[Content] = Field(default_factory=list)
    systemInstruction: Content | None = None
    tools: list[Tool] | None = None
    toolConfig: ToolConfig | None = None
    generationConfig: GenerationConfig | None = None
    cachedContent: str | None = Field(default=None, description="cachedContents/{id}: a prefix held in memory")
    safetySettings: list[dict[str, Any]] | None = Field(default=None, description="advisory: no filters here")
    labels: dict[str, str] | None = Field(default=None, description="advisory")


class CountTokensRequest(_Body):
    model_config = ConfigDict(extra="forbid")
    contents: list[Content] | None = None
    generateContentRequest: GenerateContentRequest | None = None


class CachedContentCreate(_Body):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="models/{model}")
    contents: list[Content] = Field(default_factory=list)
    systemInstruction: Content | None = None
    tools: list[Tool] | None = None
    toolConfig: ToolConfig | None = None
    displayName: str | None = Field(default=None, max_length=128)
    ttl: str | None = Field(default=None, pattern=DURATION_PATTERN, description="e.g. '300s' (default 1 hour)")
    expireTime: str | None = Field(default=None, description="RFC 3339, e.g. 2026-12-01T20:00:00Z")


class CachedContentPatch(_Body):
    """Only the lifetime of a cached content can change."""

    model_config = ConfigDict(extra="forbid")
    ttl: str | None = Field(default=None, pattern=DURATION_PATTERN)
    expireTime: str | None = None
    name: str | None = Field(default=None, description="ignored when it names this cached content")
