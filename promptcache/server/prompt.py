"""Chat prompts: messages -> the chat template's text -> token ids, and where breakpoints fall.

Both dialects reduce a request to ``TemplateMessage``s whose content is a list of text parts (joined
with ``PART_SEPARATOR``). A cache breakpoint is a ``Cut``: the end of one part (or of one tool
definition). Its token position is found in two steps, both against the *full* rendering so the ids
we place breakpoints on are exactly the ids the engine runs:

1. character offset: render the whole conversation once more with a sentinel right after the part;
   the text before the sentinel must be a prefix of the real rendering (true for any template that
   pastes content in verbatim). If not — or for a tool — render the conversation truncated at the
   cut and take the longest common prefix with the real rendering.
2. token position: tokenize that text prefix and take its longest common prefix with the full ids.
   A token that straddles the offset (BPE merging across the boundary) is left out of the prefix,
   so a breakpoint never claims a token that is not entirely before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from promptcache.tokenizer import Tokenizer

PART_SEPARATOR = "\n"  # between text parts of one message (and system blocks), as vLLM joins them
_SENTINEL = "\ue000promptcache-breakpoint\ue001"  # private-use characters: never in real text


@dataclass(frozen=True)
class TemplateMessage:
    role: str
    parts: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)  # name, tool_calls, tool_call_id

    def as_dict(self, num_parts: int | None = None, suffix: str = "") -> dict[str, Any]:
        parts = self.parts if num_parts is None else self.parts[:num_parts]
        content = PART_SEPARATOR.join(parts) + suffix
        return {"role": self.role, "content": content, **self.extra}


@dataclass(frozen=True)
class Cut:
    """The end of ``parts[part]`` of ``messages[message]``, or (message None) of ``tools[tool]``."""

    message: int | None
    part: int = 0
    tool: int = 0


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    token_ids: list[int]
    cut_tokens: list[int]  # token position of each requested Cut, in the order given


def render(tok: Tokenizer, messages: Sequence[TemplateMessage], tools: list[dict[str, Any]] | None,
           add_generation_prompt: bool = True) -> str:
    """The template's text; any template failure is a ValueError (the caller answers 400)."""
    try:
        return tok.render_chat([m.as_dict() for m in messages], add_generation_prompt=add_generation_prompt,
                               tools=tools or None)
    except ValueError:
        raise
    except Exception as e:  # a template tripping over the input (TypeError, UndefinedError, ...)
        raise ValueError(f"chat template rejected the messages: {type(e).__name__}: {e}") from None


def build_chat_prompt(tok: Tokenizer, messages: Sequence[TemplateMessage], tools: list[dict[str, Any]] | None,
                      cuts: Sequence[Cut] = ()) -> ChatPrompt:
    text = render(tok, messages, tools)
    ids = tok.encode(text, add_special_tokens=False)  # the template places BOS itself
    return ChatPrompt(text, ids, [_cut_token(tok, messages, tools, text, ids, c) for c in cuts])


def _common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _cut_token(tok: Tokenizer, messages: Sequence[TemplateMessage], tools: list[dict[str, Any]] | None,
               text: str, ids: list[int], cut: Cut) -> int:
    chars = _cut_chars(tok, messages, tools, text, cut)
    if chars <= 0:
        return 0
    return _common_prefix(tok.encode(text[:chars], add_special_tokens=False), ids)


def _cut_chars(tok: Tokenizer, messages: Sequence[TemplateMessage], tools: list[dict[str, Any]] | None,
               text: str, cut: Cut) -> int:
    if cut.message is not None:
        chars = _sentinel_chars(tok, messages, tools, text, cut.message, cut.part)
        if chars is not None:
            return chars
        msg = messages[cut.message]
        truncated = [*messages[: cut.message], replace(msg, parts=msg.parts[: cut.part + 1])]
        truncated_tools = tools
    else:
        truncated, truncated_tools = [], (tools or [])[: cut.tool + 1]
    try:
        prefix = render(tok, truncated, truncated_tools, add_generation_prompt=False)
    except ValueError:  # the template refuses a partial conversation: the breakpoint covers nothing
        return 0
    return _common_prefix(prefix, text)


def _sentinel_chars(tok: Tokenizer, messages: Sequence[TemplateMessage], tools: list[dict[str, Any]] | None,
                    text: str, message: int, part: int) -> int | None:
    msg = messages[message]
    marked_parts = (*msg.parts[:part], msg.parts[part] + _SENTINEL, *msg.parts[part + 1 :])
    marked = [*messages[:message], replace(msg, parts=marked_parts), *messages[message + 1 :]]
    try:
        marked_text = render(tok, marked, tools)
    except ValueError:
        return None
    at = marked_text.find(_SENTINEL)
    if at < 0 or not text.startswith(marked_text[:at]):
        return None
    return at
