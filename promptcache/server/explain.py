"""``promptcache explain A.json B.json``: where and why request B would miss the cache after A.

Offline: both request bodies (OpenAI chat or completions, or Anthropic messages — detected, or
``--dialect``) are validated with the server's own schemas and rendered with the model's chat
template exactly as the server renders them; then B is diagnosed as if A had just been served on
a cache large enough to keep it (so what remains is what the prompts themselves decide: the part
that differs, its offset, both texts, and what B would reuse).
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from promptcache.engine.api import NOT_CACHED, REUSED_ALL, ReuseStop, Usage
from promptcache.sequences import common_prefix_len
from promptcache.server.anthropic_prompt import build_prompt
from promptcache.server.diagnosis import MESSAGES, Diagnosis, Part, PromptRecord, diagnose
from promptcache.server.errors import ApiError
from promptcache.server.openai_api import _template_messages, chat_parts, tool_dicts
from promptcache.server.prompt import build_chat_prompt
from promptcache.server.schemas_anthropic import MessagesRequest
from promptcache.server.schemas_openai import ChatCompletionRequest, CompletionRequest
from promptcache.server.state import prompt_char_limit
from promptcache.tokenizer import Tokenizer

DIALECTS = ("openai-chat", "openai-completions", "anthropic")


@dataclass(frozen=True)
class Rendered:
    dialect: str
    parts: list[Part]
    token_ids: list[int]


def detect_dialect(body: dict[str, Any]) -> str:
    if "prompt" in body:
        return "openai-completions"
    tools = body.get("tools") or []
    blocks = [b for m in body.get("messages") or [] if isinstance(m, dict) and isinstance(m.get("content"), list)
              for b in m["content"] if isinstance(b, dict)]
    if "system" in body or any("input_schema" in t for t in tools if isinstance(t, dict)) or \
            any("cache_control" in b for b in blocks):
        return "anthropic"
    return "openai-chat"


def _validate(model: type[BaseModel], body: dict[str, Any], name: str) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{name}: {where}: {first['msg']}") from None


def render(tok: Tokenizer, body: dict[str, Any], name: str, max_model_len: int, dialect: str | None = None) -> Rendered:
    dialect = dialect or detect_dialect(body)
    max_chars = prompt_char_limit(tok, max_model_len)
    try:
        if dialect == "openai-completions":
            req = _validate(CompletionRequest, body, name)
            prompt = req.prompt if isinstance(req.prompt, str) else json.dumps(req.prompt)
            ids = tok.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
            return Rendered(dialect, [Part("prompt", MESSAGES, prompt)], ids)
        if dialect == "anthropic":
            body = {"max_tokens": 1, **body}
            areq = _validate(MessagesRequest, body, name)
            out = build_prompt(tok, areq, max_chars, max_model_len)
            return Rendered(dialect, list(out.parts), out.token_ids)
        creq = _validate(ChatCompletionRequest, body, name)
        messages, _ = _template_messages(creq)
        chat = build_chat_prompt(tok, messages, tool_dicts(creq), (), max_chars, max_model_len)
        return Rendered(dialect, chat_parts(creq), chat.token_ids)
    except ApiError as e:
        raise ValueError(f"{name}: {e.message}") from None
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def explain_pair(tok: Tokenizer, a: dict[str, Any], b: dict[str, Any], block_size: int = 16,
                 max_model_len: int = 32768, dialect: str | None = None) -> tuple[Diagnosis, Rendered, Rendered]:
    ra = render(tok, a, "A", max_model_len, dialect)
    rb = render(tok, b, "B", max_model_len, dialect or ra.dialect)
    shared = common_prefix_len(ra.token_ids, rb.token_ids)
    reusable = max(0, min(shared, len(ra.token_ids), len(rb.token_ids) - 1)) // block_size * block_size
    reason = REUSED_ALL if reusable == (len(rb.token_ids) - 1) // block_size * block_size else NOT_CACHED
    usage = Usage(prompt_tokens=len(rb.token_ids), cached_tokens=reusable, reuse_stop=ReuseStop(reason, reusable))
    model = str(a.get("model", ""))
    prev = PromptRecord("A", model, tuple(ra.parts), array("i", ra.token_ids))
    diag = diagnose(prev, rb.parts, str(b.get("model", "")), rb.token_ids, usage, block_size)
    return diag, ra, rb


def report(diag: Diagnosis) -> str:
    lines = [f"B reuses {diag.cached_tokens} of its {diag.prompt_tokens} prompt tokens after A "
             f"({diag.missed_tokens} more would be reused had B only extended A)."]
    if diag.reason == "model_changed":
        lines.append("The model differs: nothing is shared across models.")
    d = diag.divergence
    if d is not None:
        lines.append(f"The prompts first differ at {d['path']} ({d['kind']}), character {d['char_offset']}"
                     + (f", token {d['token']}" if "token" in d else "") + ":")
        lines.append(f"  A: {d['before']!r}")
        lines.append(f"  B: {d['after']!r}")
        if "note" in d:
            lines.append(f"  {d['note']}")
        if "looks_like" in d:
            lines.append(f"  The differing text looks like {d['looks_like']}: keep it out of the prompt's "
                         "stable prefix (put it last) so the rest stays cacheable.")
    elif diag.reason == REUSED_ALL:
        lines.append("B only extends A: everything A left in the cache is reused.")
    return "\n".join(lines) + "\n"
