"""Response objects and stream events of OpenAI's Responses API, shaped as the SDK parses them.

A finished generation becomes output items: a ``message`` with one ``output_text`` part (unless
the output is only tool calls) and one ``function_call`` item per call. Streaming sends
``response.created``, ``response.in_progress``, the items as they grow (``output_item.added``,
``content_part.added``, ``output_text.delta`` ..., ``function_call_arguments.delta`` / ``.done``,
``output_item.done``) and ``response.completed`` (``response.incomplete`` when max_output_tokens
cut it), every event with its ``sequence_number``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import Any

from promptcache.engine.api import RequestOutput, Usage
from promptcache.server.errors import ApiError
from promptcache.server.generation import Generation, guarded_events
from promptcache.server.openai_format import before_marker, tier_split
from promptcache.server.tools import ToolCall, ToolPlan


def usage_json(u: Usage) -> dict[str, Any]:
    return {"input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": u.cache_write_tokens},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.prompt_tokens + u.completion_tokens, **tier_split(u)}


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(mid: str, text: str, status: str = "completed") -> dict[str, Any]:
    done = status == "completed"
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if done else []
    return {"id": mid, "type": "message", "status": status, "role": "assistant", "content": content}


def call_item(fid: str, call: ToolCall, status: str = "completed") -> dict[str, Any]:
    arguments = json.dumps(call.arguments, ensure_ascii=False) if status == "completed" else ""
    return {"id": fid, "type": "function_call", "status": status, "call_id": call.id, "name": call.name,
            "arguments": arguments}


def output_items(out: RequestOutput, plan: ToolPlan | None) -> tuple[list[dict[str, Any]], str, list[ToolCall]]:
    text, calls = plan.split(out.text) if plan is not None else (out.text, [])
    items = [message_item(item_id("msg"), text)] if (text or not calls) else []
    items += [call_item(item_id("fc"), c) for c in calls]
    return items, text, calls


class ResponseShell:
    """The fields every version of one response object carries (created, in progress, done)."""

    def __init__(self, rid: str, model: str, echo: dict[str, Any]) -> None:
        self.rid, self.model, self.echo = rid, model, echo
        self.created_at = int(time.time())

    def build(self, status: str, output: list[dict[str, Any]], out: RequestOutput | None,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        body: dict[str, Any] = {
            "id": self.rid, "object": "response", "created_at": self.created_at, "status": status,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
            "error": None, "incomplete_details": incomplete, "model": self.model, "output": output,
            "usage": usage_json(out.usage) if out is not None and status != "in_progress" else None,
            **self.echo, **(extra or {}),
        }
        return body


def final_status(out: RequestOutput, calls: list[ToolCall]) -> str:
    return "incomplete" if out.finish_reason == "length" and not calls else "completed"


def response_json(shell: ResponseShell, out: RequestOutput, plan: ToolPlan | None,
                  extra: dict[str, Any]) -> tuple[dict[str, Any], str, list[ToolCall]]:
    items, text, calls = output_items(out, plan)
    return shell.build(final_status(out, calls), items, out, extra), text, calls


class _Events:
    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, kind: str, **fields: Any) -> str:
        body = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


def stream(gen: Generation, shell: ResponseShell, plan: ToolPlan | None, extra: dict[str, Any],
           on_done: Callable[[dict[str, Any], str, list[ToolCall]], None]) -> AsyncGenerator[str, None]:
    """The event stream of one response; ``on_done(response, text, calls)`` stores the final one."""
    ev = _Events()
    marker = plan.format.start if plan is not None and plan.parse else None

    async def events() -> AsyncGenerator[str, None]:
        yield ev("response.created", response=shell.build("in_progress", [], None, extra))
        yield ev("response.in_progress", response=shell.build("in_progress", [], None, extra))
        mid, sent, out = item_id("msg"), 0, gen.first
        opened = False

        def open_message() -> list[str]:
            return [ev("response.output_item.added", output_index=0, item=message_item(mid, "", "in_progress")),
                    ev("response.content_part.added", item_id=mid, output_index=0, content_index=0,
                       part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

        while True:
            safe = len(out.text) if marker is None else before_marker(out.text, marker)
            if out.finished and marker is None:
                safe = len(out.text)
            if safe > sent or (out.new_token_ids and marker is None and not out.finished):  # every token
                if not opened:
                    for e in open_message():
                        yield e
                    opened = True
                yield ev("response.output_text.delta", item_id=mid, output_index=0, content_index=0,
                         delta=out.text[sent:safe], logprobs=[])
                sent = safe
            if out.finished:
                break
            out = await gen.next()
        text, calls = plan.split(out.text) if plan is not None else (out.text, [])
        if not calls and len(text) > sent:  # held back for a call that never came
            if not opened:
                for e in open_message():
                    yield e
                opened = True
            yield ev("response.output_text.delta", item_id=mid, output_index=0, content_index=0,
                     delta=text[sent:], logprobs=[])
        if not opened and not calls:  # nothing generated: an empty message still closes the turn
            for e in open_message():
                yield e
            opened = True
        items: list[dict[str, Any]] = []
        if opened:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            yield ev("response.output_text.done", item_id=mid, output_index=0, content_index=0, text=text, logprobs=[])
            yield ev("response.content_part.done", item_id=mid, output_index=0, content_index=0, part=part)
            items.append(message_item(mid, text))
            yield ev("response.output_item.done", output_index=0, item=items[-1])
        for call in calls:
            fid, index = item_id("fc"), len(items)
            yield ev("response.output_item.added", output_index=index, item=call_item(fid, call, "in_progress"))
            arguments = json.dumps(call.arguments, ensure_ascii=False)
            yield ev("response.function_call_arguments.delta", item_id=fid, output_index=index, delta=arguments)
            yield ev("response.function_call_arguments.done", item_id=fid, output_index=index, name=call.name,
                     arguments=arguments)
            items.append(call_item(fid, call))
            yield ev("response.output_item.done", output_index=index, item=items[-1])
        status = final_status(out, calls)
        final = shell.build(status, items, out, extra)
        on_done(final, text, calls)
        yield ev("response.completed" if status == "completed" else "response.incomplete", response=final)

    def error_event(e: ApiError) -> str:
        return ev("error", code=e.code or "server_error", message=e.message, param=e.param)

    return guarded_events(gen, events(), error_event)
