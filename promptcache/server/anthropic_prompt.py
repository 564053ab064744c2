"""Anthropic requests -> template messages, cache breakpoints and the retention they ask for.

``cache_control`` rules, checked in the order Anthropic processes blocks (tools, system, messages,
then the top-level automatic breakpoint), each violation a 400 with Anthropic's wording:

- not on an empty text block;
- at most 4 breakpoints in all;
- a ``1h`` breakpoint may not come after a ``5m`` one.

The top-level ``cache_control`` (automatic caching) goes on the last non-empty block: the last
message's last block, or — when that is empty — the nearest non-empty block before it (messages,
then system, then the last tool). With nothing non-empty to put it on, it is dropped.

Each breakpoint's ttl becomes the retention of the full KV blocks it covers (everything before it);
blocks after the last breakpoint are cached too, without retention (plain LRU).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from promptcache.engine.api import Retention, Usage
from promptcache.server.diagnosis import MESSAGES, SYSTEM, TOOLS, Part
from promptcache.server.errors import ApiError
from promptcache.server.openai_format import tier_split
from promptcache.server.prompt import (
    MAX_BREAKPOINTS,
    PART_SEPARATOR,
    Cut,
    TemplateMessage,
    build_chat_prompt,
    part_text,
)
from promptcache.server.retention import parse_ttl
from promptcache.server.schemas_anthropic import ContentBlock, CountTokensRequest, TextBlock
from promptcache.tokenizer import Tokenizer

ONE_HOUR_S = 3600.0
EMPTY_BLOCK_MESSAGE = "cache_control cannot be set for empty text blocks"
TTL_ORDER_MESSAGE = ("a ttl='1h' cache_control block must not come after a ttl='5m' cache_control block. "
                     "Note that blocks are processed in the following order: `tools`, `system`, `messages`.")


@dataclass(frozen=True)
class Breakpoint:
    path: str  # JSON path of the cache_control field, for error messages
    ttl: str  # "5m" | "1h"
    cut: Cut


@dataclass(frozen=True)
class AnthropicPrompt:
    token_ids: list[int]
    retention: Retention
    parts: tuple[Part, ...] = ()  # as a diagnosis names them (server/diagnosis.py)


def _text_parts(blocks: str | Sequence[ContentBlock | TextBlock], path: str, message: int,
                breakpoints: list[Breakpoint]) -> tuple[str, ...]:
    if isinstance(blocks, str):
        return (blocks,)
    parts = []
    for j, block in enumerate(blocks):
        where = f"{path}.{j}"
        text = part_text(block.type, block.text, where)
        if block.cache_control is not None:
            if not text:
                raise ApiError(400, f"{where}.cache_control: {EMPTY_BLOCK_MESSAGE}")
            breakpoints.append(Breakpoint(f"{where}.cache_control", block.cache_control.ttl, Cut(message, j)))
        parts.append(text)
    return tuple(parts)


def _require(block: ContentBlock, where: str, *fields: str) -> None:
    for name in fields:
        if getattr(block, name) is None:
            raise ApiError(400, f"{where}.{name}: Field required")


def _tool_turn(role: str, blocks: Sequence[ContentBlock], path: str, first_index: int,
               breakpoints: list[Breakpoint]) -> list[TemplateMessage]:
    """An assistant turn with ``tool_use`` blocks (one message carrying ``tool_calls``), or a user
    turn with ``tool_result`` blocks (a ``tool`` message each, text blocks as user messages between)."""
    if role == "assistant":
        texts, calls = [], []
        for j, b in enumerate(blocks):
            where = f"{path}.{j}"
            if b.type == "tool_use":
                _require(b, where, "id", "name", "input")
                if b.cache_control is not None:
                    raise ApiError(400, f"{where}.cache_control: not supported on tool_use blocks by this server "
                                        "(put it on a text block or the tool_result)")
                calls.append({"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}})
            elif b.type == "tool_result":
                raise ApiError(400, f"{where}.type: tool_result blocks belong to user messages")
            else:
                if b.cache_control is not None:
                    raise ApiError(400, f"{where}.cache_control: not supported on the text of an assistant turn "
                                        "with tool_use blocks by this server (put it on the tool_result)")
                texts.append(part_text(b.type, b.text, where))
        return [TemplateMessage("assistant", (PART_SEPARATOR.join(t for t in texts if t),), {"tool_calls": calls})]
    out: list[TemplateMessage] = []
    pending: list[tuple[int, ContentBlock]] = []

    def flush() -> None:
        if pending:
            parts = tuple(part_text(b.type, b.text, f"{path}.{j}") for j, b in pending)
            for k, (j, b) in enumerate(pending):
                if b.cache_control is not None:
                    breakpoints.append(Breakpoint(f"{path}.{j}.cache_control", b.cache_control.ttl,
                                                  Cut(first_index + len(out), k)))
            out.append(TemplateMessage("user", parts))
            pending.clear()

    for j, b in enumerate(blocks):
        where = f"{path}.{j}"
        if b.type == "tool_use":
            raise ApiError(400, f"{where}.type: tool_use blocks belong to assistant messages")
        if b.type != "tool_result":
            if b.cache_control is not None and not b.text:
                raise ApiError(400, f"{where}.cache_control: {EMPTY_BLOCK_MESSAGE}")
            pending.append((j, b))
            continue
        flush()
        _require(b, where, "tool_use_id")
        content = b.content if b.content is not None else ""
        if isinstance(content, list):
            content = PART_SEPARATOR.join(part_text(c.type, c.text, f"{where}.content.{k}")
                                          for k, c in enumerate(content))
        if b.is_error:
            content = f"Error: {content}"
        if b.cache_control is not None:
            cut = Cut(first_index + len(out), 0)
            breakpoints.append(Breakpoint(f"{where}.cache_control", b.cache_control.ttl, cut))
        out.append(TemplateMessage("tool", (content,), {"tool_call_id": b.tool_use_id}))
    flush()
    return out


def parse_request(
    req: CountTokensRequest,
) -> tuple[list[TemplateMessage], list[dict[str, Any]], list[Breakpoint]]:
    """Validate and convert; breakpoints come back in processing order (tools, system, messages)."""
    breakpoints: list[Breakpoint] = []
    tools = []
    for k, tool in enumerate(req.tools or []):
        tools.append({"type": "function", "function": {
            "name": tool.name, "description": tool.description or "", "parameters": tool.input_schema or {}}})
        if tool.cache_control is not None:
            path = f"tools.{k}.cache_control"
            breakpoints.append(Breakpoint(path, tool.cache_control.ttl, Cut(None, tool=k)))
    messages = []
    if req.system is not None:
        messages.append(TemplateMessage("system", _text_parts(req.system, "system", 0, breakpoints)))
    for i, m in enumerate(req.messages):
        path = f"messages.{i}.content"
        if isinstance(m.content, str) or all(b.type == "text" for b in m.content):
            messages.append(TemplateMessage(m.role, _text_parts(m.content, path, len(messages), breakpoints)))
        else:
            messages.extend(_tool_turn(m.role, m.content, path, len(messages), breakpoints))
    if req.cache_control is not None:
        cut = _last_nonempty_block(messages, len(tools))
        if cut is not None:
            breakpoints.append(Breakpoint("cache_control", req.cache_control.ttl, cut))
    _check_breakpoints(breakpoints)
    return messages, tools, breakpoints


def _last_nonempty_block(messages: list[TemplateMessage], num_tools: int) -> Cut | None:
    """Where the top-level ``cache_control`` goes: the last block that is not empty text."""
    for i in reversed(range(len(messages))):
        for j in reversed(range(len(messages[i].parts))):
            if messages[i].parts[j]:
                return Cut(i, j)
    return Cut(None, tool=num_tools - 1) if num_tools else None


def _check_breakpoints(breakpoints: list[Breakpoint]) -> None:
    if len(breakpoints) > MAX_BREAKPOINTS:
        raise ApiError(400, f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
                            f"Found {len(breakpoints)}.")
    seen_5m = False
    for bp in breakpoints:
        if bp.ttl == "1h" and seen_5m:
            raise ApiError(400, f"{bp.path}.ttl: {TTL_ORDER_MESSAGE}")
        seen_5m = seen_5m or bp.ttl == "5m"


def build_prompt(tok: Tokenizer, req: CountTokensRequest, max_chars: int, max_messages: int,
                 with_breakpoints: bool = True) -> AnthropicPrompt:
    messages, tools, breakpoints = parse_request(req)
    cuts = [bp.cut for bp in breakpoints] if with_breakpoints else []
    try:
        prompt = build_chat_prompt(tok, messages, tools, cuts, max_chars, max_messages)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    marks = tuple((end, parse_ttl(bp.ttl)) for end, bp in zip(prompt.cut_tokens, breakpoints, strict=False))
    return AnthropicPrompt(prompt.token_ids, Retention(0.0, marks), _parts(req, messages, tools))


def _parts(req: CountTokensRequest, messages: list[TemplateMessage], tools: list[dict[str, Any]]) -> tuple[Part, ...]:
    """Tools (as rendered), system blocks, then each message's role and content blocks, by JSON path."""
    parts = [Part(f"tools.{k}", TOOLS, json.dumps(t, ensure_ascii=False)) for k, t in enumerate(tools)]
    if req.system is not None:
        system = messages[0]
        paths = ["system"] if isinstance(req.system, str) else [f"system.{j}" for j in range(len(system.parts))]
        parts += [Part(path, SYSTEM, text) for path, text in zip(paths, system.parts, strict=True)]
    for i, m in enumerate(req.messages):
        parts.append(Part(f"messages.{i}.role", MESSAGES, m.role))
        if isinstance(m.content, str):
            parts.append(Part(f"messages.{i}.content", MESSAGES, m.content))
            continue
        for j, b in enumerate(m.content):
            text = b.text if b.type == "text" else json.dumps(b.model_dump(exclude_none=True), ensure_ascii=False)
            parts.append(Part(f"messages.{i}.content.{j}", MESSAGES, text or ""))
    return tuple(parts)


def anthropic_usage(u: Usage) -> dict[str, Any]:
    """Anthropic's convention: ``input_tokens`` excludes cache reads and writes; the three add up to
    the prompt. Writes are the prompt tokens newly stored in blocks a breakpoint covers (ttl > 0)."""
    by_ttl = u.cache_write_tokens_by_ttl
    written_1h = sum(n for ttl, n in by_ttl.items() if ttl >= ONE_HOUR_S)
    written_5m = sum(n for ttl, n in by_ttl.items() if 0 < ttl < ONE_HOUR_S)
    creation = written_5m + written_1h
    return {
        "input_tokens": u.prompt_tokens - u.cached_tokens - creation,
        "cache_creation_input_tokens": creation,
        "cache_read_input_tokens": u.cached_tokens,
        "cache_creation": {"ephemeral_5m_input_tokens": written_5m, "ephemeral_1h_input_tokens": written_1h},
        "output_tokens": u.completion_tokens,
        **tier_split(u),
    }
