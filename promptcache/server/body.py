"""Request bodies parsed off the event loop, with their item counts bounded before validation.

FastAPI decodes and validates a body parameter on the event loop: a 29.7 MB body of 900k empty
messages spent 6.6 s there (almost all of it in pydantic building 900k message models) while
``/health`` and every stream stalled. Here a route declares its body as ``JsonBody(Model)``: the
bytes are read on the loop (bounded and timed by ``ApiGuard``); decoding, the count checks and
validation run in a worker thread; and a list that cannot fit in the model's context — more
messages than the context has tokens (each takes one at least), more token ids than it holds — is
refused after decoding and before any model is built, so validation work is bounded by the context,
not by the body.

What remains on the GIL in one piece is ``json.loads`` (about 9 ms per MB on a 2-core EPYC; the
body is at most ``--max-request-bytes``). Errors are the same ``RequestValidationError`` FastAPI
raises, so they reach the client as 400s in the dialect's envelope (``errors.py``).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from promptcache.server.errors import ApiError
from promptcache.server.prompt import too_many_messages
from promptcache.server.state import get_state

M = TypeVar("M", bound=BaseModel)
_JSON_TYPES = ("application/json", "text/json")


def parse_body(model: type[M], raw: bytes, max_items: int) -> M:
    """``raw`` as a ``model``; RequestValidationError (or ApiError) for what a client must fix."""
    if not raw.strip():
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required",
                                       "input": None}])
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        error = e.msg if isinstance(e, json.JSONDecodeError) else "the body is not UTF-8"
        pos = e.pos if isinstance(e, json.JSONDecodeError) else e.start
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", pos), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": error}}]) from None
    except RecursionError:
        raise ApiError(400, "the request body nests JSON too deeply") from None
    if isinstance(obj, dict):
        check_counts(obj, max_items)
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def check_counts(obj: dict[str, Any], max_items: int) -> None:
    """Refuse lists no prompt of ``max_items`` tokens can hold, before they are validated: messages
    (a token each at least), token ids, content parts (4 per token of context: generous, since a
    separator may merge into a token) and tools."""
    messages = obj.get("messages")
    if isinstance(messages, list) and len(messages) > max_items:
        raise ApiError(400, too_many_messages(len(messages), max_items), param="messages")
    if isinstance(messages, list):  # content parts: a template renders each with a separator at least
        parts = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list))
        if parts > 4 * max_items:
            raise ApiError(400, f"the messages have {parts} content parts: more than the model's context of "
                                f"{max_items} tokens can hold", param="messages")
    tools = obj.get("tools")
    if isinstance(tools, list) and len(tools) > max_items:
        raise ApiError(400, f"{len(tools)} tools: more than the model's context of {max_items} tokens can hold",
                       param="tools")
    prompt = obj.get("prompt")
    if isinstance(prompt, list):
        lengths = [len(prompt)] + [len(p) for p in prompt if isinstance(p, list)]
        if max(lengths) > max_items:
            raise ApiError(400, f"the prompt has {max(lengths)} token ids: more than the model's context of "
                                f"{max_items} tokens", param="prompt")


async def read_json(request: Request, model: type[M]) -> M:
    """The request's body as ``model`` (content type checked, parsed and validated off the loop)."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type not in _JSON_TYPES and not content_type.endswith("+json"):
        raise ApiError(400, f"the request body must be JSON (Content-Type: application/json), "
                            f"not {content_type or 'empty'}")
    raw = await request.body()
    return await run_in_threadpool(parse_body, model, raw, get_state(request).max_model_len)


def JsonBody(model: type[M]) -> Any:  # noqa: N802 — reads like the type it stands for
    """A route parameter: ``body: Annotated[Model, JsonBody(Model)]``. The spec's request body comes
    from ``openapi.json_request(Model)`` (FastAPI sees a dependency, not a body)."""

    async def dependency(request: Request) -> M:
        return await read_json(request, model)

    return Depends(dependency)
