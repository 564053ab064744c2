"""Constrained decoding: the tokens a grammar allows next, with llguidance.

*Why llguidance* (over xgrammar): it is the grammar engine of vLLM's ``guidance`` backend, SGLang
and llama.cpp; its wheel has no dependencies (xgrammar's requires torch, which would fight our
pinned CPU build); it compiles JSON Schema, regexes and Lark grammars lazily, so a request's first
token does not wait for a full automaton; and it computes a token mask in tens of microseconds
for a 4k-150k vocabulary.

A request's ``SamplingParams.structured`` (``StructuredOutput``) becomes one ``Matcher`` per
request, owned by the sampler: before each sample its mask sends every token the grammar forbids
to -inf (so greedy, temperature, top-k/p and seeds work as usual, and batches mix constrained and
free requests), and the sampled token advances it. When the grammar is complete only end-of-text
is allowed, so the request ends with ``finish_reason="stop"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from promptcache.engine.sampling import StructuredOutput

# Compact JSON: no whitespace between tokens (a schema's "x-guidance" may say otherwise). With the
# library's default (any whitespace anywhere) a weak model can pad an object with newlines until
# max_tokens and never close it — a failure vLLM and SGLang users report with grammar backends.
JSON_DEFAULTS: Any = {"whitespace_flexible": False}  # llguidance's JsonCompileOptions (a stub-only type)


class Matcher:
    """One request's grammar state."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._m = matcher
        self._vocab = vocab_size
        self._mask = np.zeros(vocab_size, dtype=bool)  # reused: rows past the tokenizer's vocabulary stay False

    def allowed(self) -> torch.Tensor:
        """[vocab] bool: the tokens the grammar allows next (a fresh tensor; callers may change it)."""
        bits = np.unpackbits(np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8), bitorder="little")
        n = min(self._vocab, bits.shape[0])
        self._mask[:n] = bits[:n]
        return torch.from_numpy(self._mask.copy())

    def accept(self, token_id: int) -> None:
        self._m.consume_token(token_id)

    @property
    def done(self) -> bool:
        return bool(self._m.is_stopped())

    @property
    def error(self) -> str | None:
        return str(self._m.get_error()) if self._m.is_error() else None


class Grammars:
    """Compiles ``StructuredOutput`` against one model's tokenizer (built on first use: ~1 s)."""

    def __init__(self, tokenizer_json_path: str, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._path = tokenizer_json_path
        self._vocab = vocab_size
        self._eos = sorted(eos_token_ids)
        self._tokenizer: Any = None

    def _lltokenizer(self) -> Any:
        if self._tokenizer is None:
            from llguidance import LLTokenizer

            with open(self._path, encoding="utf-8") as f:
                self._tokenizer = LLTokenizer(f.read(), n_vocab=self._vocab, eos_token=self._eos or None)
        return self._tokenizer

    def matcher(self, structured: StructuredOutput) -> Matcher:
        """A fresh matcher; ValueError (a 400) for a schema or grammar llguidance cannot compile."""
        from llguidance import LLMatcher

        try:
            if structured.kind == "json_schema":
                grammar = LLMatcher.grammar_from_json_schema(structured.spec, defaults=JSON_DEFAULTS)
            elif structured.kind == "json_object":
                grammar = LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_DEFAULTS)
            elif structured.kind == "regex":
                grammar = LLMatcher.grammar_from_regex(structured.spec)
            else:
                grammar = LLMatcher.grammar_from_lark(structured.spec)
        except ValueError as e:
            raise ValueError(f"invalid {structured.kind}: {e}") from None
        m = LLMatcher(self._lltokenizer(), grammar, log_level=0)
        if m.is_error():
            raise ValueError(f"invalid {structured.kind}: {m.get_error()}")
        return Matcher(m, self._vocab)
