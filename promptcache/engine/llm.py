"""The offline Python API, shaped like vLLM's ``LLM``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from promptcache.cache import NO_RETENTION, Retention
from promptcache.engine.config import EngineConfig
from promptcache.engine.llm_engine import LLMEngine
from promptcache.engine.request import RequestOutput, RequestSpec
from promptcache.engine.sampling import SamplingParams

Prompt = str | Sequence[int]


class LLM:
    """``LLM(model="path-or-hub-id-or-random:shape")``; every other keyword is an ``EngineConfig`` field."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.engine = LLMEngine(EngineConfig.of(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def _to_ids(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | None = None,
        tenant: str | None = None,
        retention: Retention = NO_RETENTION,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids), batched together; outputs in input order."""
        batch: list[Prompt]
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            batch = [prompts]  # type: ignore[list-item]
        else:
            batch = list(prompts)  # type: ignore[arg-type]
        params = params or SamplingParams()
        specs = []
        for prompt in batch:  # validate everything before anything starts
            spec = RequestSpec(f"llm-{next(self._ids)}", self._to_ids(prompt), params, tenant, retention)
            self.engine.validate(spec)
            specs.append(spec)
        order = []
        for spec in specs:
            self.engine.add_request(spec)
            order.append(spec.request_id)
        return self._run(order, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        params: SamplingParams | None = None,
        **kwargs: Any,
    ) -> list[RequestOutput]:
        """Render one conversation (or a list of them) with the chat template, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c) for c in convs]  # type: ignore[arg-type]
        return self.generate(prompts, params, **kwargs)

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(order), desc="generating", disable=not use_tqdm)
        wanted = set(order)
        while self.engine.has_unfinished_requests() and len(done) < len(order):
            for out in self.engine.step():
                if out.finished and out.request_id in wanted:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [done[rid] for rid in order]

    def reset_prefix_cache(self) -> int:
        return self.engine.reset_prefix_cache()

    def stats(self) -> dict[str, int]:
        return self.engine.stats()
