"""Tokenizer and chat template from a Hugging Face checkpoint directory (torch-free).

Uses the `tokenizers` library on ``tokenizer.json`` and renders ``chat_template`` from
``tokenizer_config.json`` with a sandboxed Jinja environment, the way transformers does, so the
same messages always give the same token ids (the prefix cache depends on that).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

DEFANG_MARK = "\udbff"  # a lone surrogate: valid in a Python str, refused in every request


def _raise(message: str) -> None:
    raise TemplateError(message)


def _special_str(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{directory} has no tokenizer.json (a fast tokenizer is required)")
        self._tok = HFTokenizer.from_file(str(path))
        cfg_path = directory / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.chat_template: str | None = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take "default"
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default")
        jinja_path = directory / "chat_template.jinja"
        if self.chat_template is None and jinja_path.exists():
            self.chat_template = jinja_path.read_text()
        self.bos_token = _special_str(self.config.get("bos_token"))
        self.eos_token = _special_str(self.config.get("eos_token"))

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    # ---- control tokens typed by a user --------------------------------------------------------
    # A chat template's control tokens (``<|im_start|>``, ...) must come from the template only:
    # typed in message content they would otherwise become control tokens too (role injection).
    # The server defangs them in content before rendering — a lone surrogate, which no request can
    # carry (the server refuses them), is put after their first character — and ``encode_rendered``
    # encodes each defanged one as plain text.

    @cached_property
    def control_tokens(self) -> tuple[str, ...]:
        found = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special and t.content}
        return tuple(sorted(found, key=len, reverse=True))  # longest first: one may contain another

    def defang(self, text: str) -> str:
        """``text`` with every control token made inert (for message content, before rendering)."""
        for token in self.control_tokens:
            if token in text:
                text = text.replace(token, token[0] + DEFANG_MARK + token[1:])
        return text

    @cached_property
    def _as_text(self) -> HFTokenizer:
        tok = HFTokenizer.from_str(self._tok.to_str())
        tok.encode_special_tokens = True  # control-token strings are split into ordinary tokens
        return tok

    def encode_rendered(self, text: str) -> list[int]:
        """Token ids of a rendered chat prompt: the template's control tokens as control tokens,
        defanged ones (typed by a user) as the plain text they are. No BOS added (the template
        places it)."""
        if DEFANG_MARK not in text:
            return self.encode(text, add_special_tokens=False)
        ids: list[int] = []
        rest = text
        while (at := rest.find(DEFANG_MARK)) >= 0:
            start = at - 1  # the control token's first character precedes the mark
            token = next(t for t in self.control_tokens if rest.startswith(t[0] + DEFANG_MARK + t[1:], start))
            if start:
                ids += self.encode(rest[:start], add_special_tokens=False)
            ids += self._as_text.encode(token, add_special_tokens=False).ids
            rest = rest[start + len(token) + len(DEFANG_MARK) :]
        if rest:
            ids += self.encode(rest, add_special_tokens=False)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._tok.id_to_token(i) or "" for i in ids]

    @cached_property
    def _template(self):
        if not self.chat_template:
            raise ValueError("this model has no chat template; send a raw prompt instead")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii
        )
        return env.from_string(self.chat_template)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render messages with the model's chat template to the exact prompt text."""
        try:
            return str(
                self._template.render(
                    messages=messages,
                    tools=tools,
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token or "",
                    eos_token=self.eos_token or "",
                    **kwargs,
                )
            )
        except TemplateError as e:
            raise ValueError(f"chat template rejected the messages: {e}") from e

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        """Token ids of the rendered conversation; control tokens typed in string contents are text."""
        safe = [{**m, "content": self.defang(m["content"])} if isinstance(m.get("content"), str) else m
                for m in messages]
        # The template already places BOS where the model wants it: never add it again.
        return self.encode_rendered(self.render_chat(safe, **kwargs))


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting a UTF-8 character.

    Decodes a short window of tokens (``prefix_offset`` .. end) and emits only the part past what
    was already emitted; when the window ends in an incomplete byte sequence (U+FFFD), waits.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.token_ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full = decode(self.token_ids[self.prefix_offset :], self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.token_ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of generation emit whatever is left, even an incomplete character."""
        full = self.tokenizer.decode(self.token_ids, self.skip_special_tokens)
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += delta
        return delta
