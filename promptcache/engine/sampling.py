"""Sampling parameters (validated at construction) and the per-request sampling state."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

KINDS = ("json_schema", "json_object", "regex", "lark")


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match. ``kind``: ``json_schema`` (``spec`` is the schema as JSON text),
    ``json_object`` (any JSON object), ``regex`` or ``lark`` (``spec`` is the pattern / grammar)."""

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> StructuredOutput:
        return cls("json_schema", json.dumps(schema))


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop. Field names follow vLLM's.

    ``temperature=0`` is greedy. ``top_k <= 0`` and ``top_p == 1`` disable those filters.
    ``logit_bias`` is added to the logits first (-100 bans a token, +100 all but forces it);
    ``structured`` then masks every token its grammar does not allow.
    ``logprobs=k`` returns, for every generated token, its log-probability and the ``k`` most likely
    alternatives (log-softmax of the model's logits, before temperature — what OpenAI reports).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, [-100, 100]
    structured: StructuredOutput | None = None  # the output must match it (engine/structured.py)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            self.top_k = 0
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        for token_id, bias in self.logit_bias.items():
            if not (isinstance(token_id, int) and token_id >= 0):
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token_id!r}")
            if not -100.0 <= bias <= 100.0:  # also rejects NaN
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias!r} for token {token_id}")

    @property
    def greedy(self) -> bool:
        # below 1e-5 logits / temperature overflows to inf; it is greedy in all but name (as in vLLM)
        return self.temperature < 1e-5 or self.top_k == 1
