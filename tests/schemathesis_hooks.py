"""Hooks for the schemathesis run of ``test_schemathesis.py`` (loaded by the CLI through
``SCHEMATHESIS_HOOKS``).

- Generation requests are bounded (``max_tokens`` at most 8) so each case costs milliseconds.
- A schema-valid request may be refused for a rule JSON Schema cannot state; such a refusal is not
  a failure only when its message quotes one of ``CROSS_FIELD_RULES``.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis.openapi.checks import RejectedPositiveData

MAX_TOKENS = 8
CROSS_FIELD_RULES = (
    "A maximum of 4 blocks with cache_control may be provided",  # counted over the whole request
    "At most 4 content parts may carry prompt_cache_breakpoint",
    "must not come after a ttl='5m' cache_control block",  # Anthropic's ttl order
    "ttl must be between 0 and 30 days",  # "99999d" matches the duration pattern
    "but the model's context is",  # prompt + template longer than the context (known once tokenized)
    "more than the model's context can hold",
    "logit_bias: token id",  # a key past the vocabulary (keys are strings: no maximum to state)
    "invalid json_schema",  # a response_format schema llguidance cannot compile (known by compiling it)
    "invalid lark",  # ... or a tool's schema, when a call is forced
    "blocks belong to assistant messages",  # which roles may carry tool_use / tool_result blocks
    "blocks belong to user messages",
    "not supported on the text of an assistant turn",  # cache_control beside tool_use blocks
    "is not among the tools",  # a named tool choice must name one of the request's tools
    "needs tools",  # tool_choice required / any / tool without tools
    "a forced tool call and response_format cannot be combined",
    "a forced tool call and text.format cannot be combined",
    "item needs",  # which fields a Responses input item needs depends on its type
    "pageToken is not one this server issued",  # page tokens are opaque: any string is schema-valid
    "must expire in the future",  # expireTime: a date-time, but one that has passed
    "CachedContent can not be used with",  # Gemini: cachedContent beside systemInstruction / tools
    "is not among the functionDeclarations",  # allowedFunctionNames must name declared functions
    "exceeds the budget of",  # Gemini: a tenant's pinned tokens (the run's own cached contents add up)
    "tokens pins may take",  # ... and the whole server's
    "needs responseMimeType",  # a responseSchema is for JSON output
    "is not supported with stream=true",  # n > 1 and stream together
)


@schemathesis.hook
def map_body(context: Any, body: Any) -> Any:
    if isinstance(body, dict):
        config = body.get("generationConfig")
        for where, field in ((body, "max_tokens"), (body, "max_completion_tokens"), (body, "max_output_tokens"),
                             (config if isinstance(config, dict) else {}, "maxOutputTokens")):
            value = where.get(field)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > MAX_TOKENS:
                where[field] = MAX_TOKENS
    return body


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every failure but a schema-valid request refused for a listed cross-field rule."""
    return not (isinstance(failure, RejectedPositiveData) and response is not None and response.status_code == 400
                and any(rule in response.text for rule in CROSS_FIELD_RULES))
