"""Chat prompts: messages -> the chat template's text -> token ids, and where breakpoints fall.

Both dialects reduce a request to ``TemplateMessage``s whose content is a list of text parts (joined
with ``PART_SEPARATOR``). A cache breakpoint is a ``Cut``: the end of one part (or of one tool
definition). Its token position is found in two steps, both against the *full* rendering so the ids
we place breakpoints on are exactly the ids the engine runs:

1. character offset. After a message part: render the whole conversation once more with a sentinel
   right after the part; the text before the sentinel must be a prefix of the real rendering (true
   for any template that pastes content in verbatim). If not, render the conversation truncated at
   the cut and take the longest common prefix with the real rendering. After tool ``k``: render the
   whole conversation with ``tools[:k+1]`` and again with a sentinel tool appended; tool ``k`` ends
   where the two part ways. A template that does not render tools gives 0 (no sentinel appears).
2. token position: tokenize that text prefix and take its longest common prefix with the full ids.
   A token that straddles the offset (BPE merging across the boundary) is left out of the prefix,
   so a breakpoint never claims a token that is not entirely before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from promptcache.sequences import common_prefix_len
from promptcache.server.errors import ApiError
from promptcache.tokenizer import DEFANG_MARK, Tokenizer

PART_SEPARATOR = "\n"  # between text parts of one message (and system blocks), as vLLM joins them
TEXT_PART_TYPES = ("text", "input_text")
# lone surrogates: no request can carry one (schemas_base refuses them), so no client can forge it
_SENTINEL = "\ud800promptcache-breakpoint\udfff"


@dataclass(frozen=True)
class TemplateMessage:
    role: str
    parts: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)  # name, tool_calls, tool_call_id

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "content": PART_SEPARATOR.join(self.parts), **self.extra}


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


MAX_BREAKPOINTS = 4  # per request, as the providers allow: each costs a render and a tokenization


def part_text(kind: str, text: str | None, where: str) -> str:
    """One content part's text, or a 400 naming ``where`` (its JSON path in the caller's dialect)."""
    if kind not in TEXT_PART_TYPES:
        raise ApiError(400, f"{where}.type: content of type {kind!r} is not supported by this server "
                            "(text only)", param=f"{where}.type")
    if text is None:
        raise ApiError(400, f"{where}.text: Field required", param=f"{where}.text")
    return text


def check_prompt_chars(num_chars: int, max_chars: int) -> None:
    """Refuse, before tokenizing it, a prompt too long in characters to fit the context in tokens."""
    if num_chars > max_chars:
        raise ValueError(f"the prompt is {num_chars} characters long: more than the model's context can "
                         f"hold (at most {max_chars} characters)")


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


def too_many_messages(num_messages: int, max_messages: int) -> str:
    return (f"the conversation has {num_messages} messages: more than the model's context can hold "
            f"(at most {max_messages} tokens, and every message takes at least one)")


def check_before_render(messages: Sequence[TemplateMessage], tools: list[dict[str, Any]] | None,
                        max_chars: int, max_messages: int) -> None:
    """Refuse, before any template runs, a conversation that cannot fit: rendering copies the content
    characters (templates that drop some — trimmed whitespace, earlier turns' reasoning — drop little
    next to the limit's margin of 2x), and
    chat templates render each message with at least one token of markup (more messages than the
    context has tokens cannot fit). A 29.7 MB body of 900k empty messages took 6.6 s of rendering to
    be refused."""
    if len(messages) > max_messages:
        raise ValueError(too_many_messages(len(messages), max_messages))
    # tools are not counted: a template may leave them out, and this must be a lower bound
    check_prompt_chars(sum(len(p) for m in messages for p in m.parts), max_chars)


def build_chat_prompt(tok: Tokenizer, messages: Sequence[TemplateMessage], tools: list[dict[str, Any]] | None,
                      cuts: Sequence[Cut], max_chars: int, max_messages: int,
                      add_generation_prompt: bool = True) -> ChatPrompt:
    """Raises ValueError (a 400) when the template refuses the messages or the text is too long.
    Without ``add_generation_prompt`` the text ends with the last message (a prefix to cache)."""
    if len(cuts) > MAX_BREAKPOINTS:
        raise ValueError(f"at most {MAX_BREAKPOINTS} cache breakpoints may be set in one request; found {len(cuts)}")
    check_before_render(messages, tools, max_chars, max_messages)
    # control tokens typed in content or tools are text, not markup (tokenizer.py: defang)
    messages = [_defanged(tok, m) for m in messages]
    tools = _defang_value(tok, tools) if tools else tools
    text = render(tok, messages, tools, add_generation_prompt)
    check_prompt_chars(len(text), max_chars)
    ids = tok.encode_rendered(text)  # the template places BOS itself
    cut_tokens = [_cut_token(tok, messages, tools, text, ids, c) for c in cuts]
    return ChatPrompt(text.replace(DEFANG_MARK, ""), ids, cut_tokens)


def _defanged(tok: Tokenizer, m: TemplateMessage) -> TemplateMessage:
    return replace(m, parts=tuple(tok.defang(p) for p in m.parts), extra=_defang_value(tok, m.extra))


def _defang_value(tok: Tokenizer, value: Any) -> Any:
    if isinstance(value, str):
        return tok.defang(value)
    if isinstance(value, list):
        return [_defang_value(tok, v) for v in value]
    if isinstance(value, dict):
        return {k: _defang_value(tok, v) for k, v in value.items()}
    return value


def _cut_token(tok: Tokenizer, messages: Sequence[TemplateMessage], tools: list[dict[str, Any]] | None,
               text: str, ids: list[int], cut: Cut) -> int:
    if cut.message is None:
        chars = _tool_end_chars(tok, messages, tools or [], text, cut.tool)
    else:
        chars = _part_end_chars(tok, messages, tools, text, cut.message, cut.part)
    if chars <= 0:
        return 0
    return common_prefix_len(tok.encode_rendered(text[:chars]), ids)


def _part_end_chars(tok: Tokenizer, messages: Sequence[TemplateMessage], tools: list[dict[str, Any]] | None,
                    text: str, message: int, part: int) -> int:
    msg = messages[message]
    marked_parts = (*msg.parts[:part], msg.parts[part] + _SENTINEL, *msg.parts[part + 1 :])
    marked = [*messages[:message], replace(msg, parts=marked_parts), *messages[message + 1 :]]
    try:
        marked_text = render(tok, marked, tools)
        at = marked_text.find(_SENTINEL)
        if at >= 0 and text.startswith(marked_text[:at]):
            return at
    except ValueError:
        pass
    truncated = [*messages[:message], replace(msg, parts=msg.parts[: part + 1])]
    try:
        return common_prefix_len(render(tok, truncated, tools, add_generation_prompt=False), text)
    except ValueError:  # the template refuses a partial conversation: the breakpoint covers nothing
        return 0


def _tool_end_chars(tok: Tokenizer, messages: Sequence[TemplateMessage], tools: list[dict[str, Any]],
                    text: str, tool: int) -> int:
    head = tools[: tool + 1]
    function = {**head[-1].get("function", {}), "name": _SENTINEL, "description": _SENTINEL}
    marker = {**head[-1], "function": function}
    try:
        without = render(tok, messages, head)
        with_marker = render(tok, messages, [*head, marker])
    except ValueError:
        return 0
    at = with_marker.find(_SENTINEL)
    if at < 0:  # the template does not render tools
        return 0
    return min(at, common_prefix_len(without, with_marker), common_prefix_len(without, text))
