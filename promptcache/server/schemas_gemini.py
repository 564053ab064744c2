"""Request bodies of the Gemini dialect (generateContent, countTokens, cachedContents), in the
API's camelCase. Parts carry text, ``functionCall`` or ``functionResponse`` (other kinds — inline
data, files, code — are a 400 naming them); unknown fields are a 400 naming them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from promptcache.server.schemas_base import JsonInt, NonEmptyStr, NonNegativeInt, PositiveInt
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
    # (null counts as absent, as the handler reads it)
    kinds = {"text": {"type": "string"}, "functionCall": {"type": "object"}, "functionResponse": {"type": "object"}}
    schema["additionalProperties"] = False
    schema["oneOf"] = [{"required": [k], "properties": {k: t}} for k, t in kinds.items()]


class Part(_Body):
    model_config = ConfigDict(extra="allow", json_schema_extra=_part_schema)
    text: str | None = None
    functionCall: FunctionCall | None = None
    functionResponse: FunctionResponse | None = None
    thought: bool | None = None


class Content(_Body):
    role: Literal["user", "model", "function"] | None = None
    parts: list[Part] = Field(min_length=1)


def _text_part(schema: dict[str, Any]) -> None:
    schema["required"] = ["text"]
    schema["properties"]["text"] = {"type": "string", "title": "Text"}
    schema["additionalProperties"] = False


class TextPart(_Body):
    model_config = ConfigDict(extra="allow", json_schema_extra=_text_part)
    text: str | None = None


class SystemContent(_Body):
    """A system instruction: text parts only."""

    role: str | None = None
    parts: list[TextPart] = Field(min_length=1)


class FunctionDeclaration(_Body):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="OpenAPI schema (types OBJECT, STRING...)")
    parametersJsonSchema: dict[str, Any] | None = None
    response: dict[str, Any] | None = None
    responseJsonSchema: dict[str, Any] | None = None
    behavior: str | None = None


class GeminiTool(_Body):
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
    topK: PositiveInt | None = None
    maxOutputTokens: NonNegativeInt | None = None
    stopSequences: list[NonEmptyStr] | None = Field(default=None, max_length=5)
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
    contents: list[Content] = Field(min_length=1)
    systemInstruction: SystemContent | None = None
    tools: list[GeminiTool] | None = None
    toolConfig: ToolConfig | None = None
    generationConfig: GenerationConfig | None = None
    cachedContent: str | None = Field(default=None, description="cachedContents/{id}: a prefix held in memory")
    safetySettings: list[dict[str, Any]] | None = Field(default=None, description="advisory: no filters here")
    labels: dict[str, str] | None = Field(default=None, description="advisory")


def _contents_or_request(schema: dict[str, Any]) -> None:
    schema["anyOf"] = [{"required": ["contents"], "properties": {"contents": {"type": "array"}}},
                       {"required": ["generateContentRequest"],
                        "properties": {"generateContentRequest": {"type": "object"}}}]


class GeminiCountTokensRequest(_Body):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_contents_or_request)
    contents: list[Content] | None = Field(default=None, min_length=1)
    generateContentRequest: GenerateContentRequest | None = None


def _contents_or_system(schema: dict[str, Any]) -> None:
    schema["anyOf"] = [{"required": ["contents"], "properties": {"contents": {"minItems": 1}}},
                       {"required": ["systemInstruction"], "properties": {"systemInstruction": {"type": "object"}}}]


class CachedContentCreate(_Body):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_contents_or_system)
    model: str = Field(description="models/{model}")
    contents: list[Content] = Field(default_factory=list)
    systemInstruction: SystemContent | None = None
    tools: list[GeminiTool] | None = None
    toolConfig: ToolConfig | None = None
    displayName: str | None = Field(default=None, max_length=128)
    ttl: str | None = Field(default=None, pattern=DURATION_PATTERN, description="e.g. '300s' (default 1 hour)")
    expireTime: str | None = Field(default=None, description="RFC 3339, e.g. 2026-12-01T20:00:00Z",
                                   json_schema_extra={"format": "date-time"})


class CachedContentPatch(_Body):
    """Only the lifetime of a cached content can change."""

    model_config = ConfigDict(extra="forbid")
    ttl: str | None = Field(default=None, pattern=DURATION_PATTERN)
    expireTime: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    name: str | None = Field(default=None, description="ignored when it names this cached content")
