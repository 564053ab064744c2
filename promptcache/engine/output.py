"""Detokenisation and stop conditions for one request's generated tokens (torch-free)."""

from __future__ import annotations

from collections.abc import Collection

from promptcache.engine.request import Request
from promptcache.tokenizer import IncrementalDetokenizer, Tokenizer


class OutputState:
    """Follows one request's output: text so far, what has been streamed, whether it must stop.

    With stop strings, the last ``max_stop_len - 1`` characters are held back from streaming until
    it is certain they do not begin a stop string (which is cut from the output, as OpenAI does).
    """

    def __init__(self, request: Request, tokenizer: Tokenizer, eos_token_ids: Collection[int]) -> None:
        self.request = request
        self.detok = IncrementalDetokenizer(tokenizer, request.params.skip_special_tokens)
        self.eos_token_ids = set() if request.params.ignore_eos else set(eos_token_ids)
        self.stop_token_ids = set(request.params.stop_token_ids)
        self.stops = request.params.stop
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.num_emitted_chars = 0
        self.num_emitted_tokens = 0

    def on_token(self, token_id: int, max_model_len: int) -> str | None:
        """Account for a new token; return a finish reason if the request must end now."""
        req = self.request
        if token_id in self.stop_token_ids:
            req.stop_reason = token_id
            return "stop"
        if token_id in self.eos_token_ids:
            return "stop"
        before = len(self.text)
        self.text += self.detok.push(token_id)
        if self.stops:
            start = max(0, before - self.hold)
            hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
            if hits:
                idx, stop = min(hits)
                self.text = self.text[:idx]
                req.stop_reason = stop
                return "stop"
        if len(req.output_token_ids) >= req.params.max_tokens or req.num_tokens >= max_model_len:
            return "length"
        return None

    def finish_text(self, reason: str) -> None:
        if reason == "length" or (reason == "abort" and not self.stops):
            self.text += self.detok.flush()

    def take_new(self, finished: bool) -> tuple[str, list[int]]:
        """Text and token ids not yet reported (everything, once finished)."""
        safe = len(self.text) if finished else max(self.num_emitted_chars, len(self.text) - self.hold)
        new_text = self.text[self.num_emitted_chars : safe]
        self.num_emitted_chars = safe
        new_tokens = self.request.output_token_ids[self.num_emitted_tokens :]
        self.num_emitted_tokens = len(self.request.output_token_ids)
        return new_text, new_tokens
