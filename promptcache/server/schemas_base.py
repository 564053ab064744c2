"""The base of every request body model: strict JSON types, unknown fields ignored, lone surrogates
refused.

JSON may carry ``"\\ud800"``, an escape for half of a UTF-16 pair; Python decodes it into a ``str``
that no UTF-8 encoder (the tokenizer, the response renderer) accepts. Any surrogate left in a
decoded ``str`` is such a lone half (the JSON decoder joins real pairs), so it is a 400 here, in
the dialect's envelope, before it can reach the tokenizer.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

_SURROGATE = re.compile("[\ud800-\udfff]")


def has_lone_surrogate(value: Any) -> bool:
    """Whether any string in ``value`` (nested lists and dicts too, keys included) holds one."""
    pending = [value]
    while pending:  # iterative: deep JSON nesting must not exhaust the stack
        item = pending.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _integral(value: Any) -> Any:
    """JSON Schema counts 1024.0 as an integer: accept integral floats for int fields (strict mode
    would refuse them), never booleans, strings or 1.5."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_integral)]  # an int field as JSON (and JSON Schema) means it

# Bounds sit inside the Annotated, before the validator: as Field(ge=1) on a JsonInt field pydantic
# still enforces them but writes "ge": 1 into the JSON schema, which no client or fuzzer reads.
NonNegativeInt = Annotated[int, Field(ge=0), BeforeValidator(_integral)]
PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(_integral)]
NumLogprobs = Annotated[int, Field(ge=0, le=20), BeforeValidator(_integral)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


def text_required(schema: dict[str, Any]) -> None:
    """``json_schema_extra`` of a content part: the spec says its text is a required string (the
    types served have one); the model lets it be missing so that a part of another type gets a 400
    naming its type rather than "text: Field required"."""
    schema["required"] = ["type", "text"]
    schema["properties"]["text"] = {"type": "string", "title": "Text"}


class RequestBody(BaseModel):
    # strict: JSON types as declared — "stream": "yes" is not a bool, [true, false] are not token ids
    # (lax coercion once streamed the first and ran the second as ids [1, 0]); ints pass for floats
    model_config = ConfigDict(extra="ignore", strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _refuse_lone_surrogates(cls, value: Any) -> Any:
        if has_lone_surrogate(value):
            raise PydanticCustomError("lone_surrogate", "contains a lone UTF-16 surrogate (e.g. \\ud800), "
                                                        "which is not valid Unicode text")
        return value
