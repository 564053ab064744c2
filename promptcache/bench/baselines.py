"""Hugging Face transformers on the same checkpoint, dtype, token ids and thread count.

Made as strong as plain transformers gets on CPU: ``torch.inference_mode``, SDPA attention,
``logits_to_keep=1`` (only the last position goes through the LM head), no generate() overhead.
"Manual prompt reuse" is the user-level alternative to an engine cache: prefill the shared
prefix once into a ``DynamicCache`` and give each request a deep copy of it (a forward extends the
cache in place, so reusing it needs a copy).
"""

from __future__ import annotations

import copy
import inspect
import time
from pathlib import Path
from typing import Any

import torch

from promptcache.engine.precision import dtype_name


class TransformersBaseline:
    def __init__(self, model_dir: Path, dtype: torch.dtype) -> None:
        try:
            import transformers
            from transformers import AutoModelForCausalLM
        except ImportError as e:  # a dev extra, not a runtime dependency
            raise ValueError("--baseline transformers needs `pip install transformers`") from e
        self.version = transformers.__version__
        dtype_kw = "dtype" if int(self.version.split(".")[0]) >= 5 else "torch_dtype"
        kwargs: dict[str, Any] = {dtype_kw: dtype, "attn_implementation": "sdpa"}
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs).eval()
        self._forward_kwargs: dict[str, Any] = {"use_cache": True}
        params = inspect.signature(self.model.forward).parameters
        if "logits_to_keep" in params:
            self._forward_kwargs["logits_to_keep"] = 1
        # the KV cache argument: ``cache`` from transformers 5.25 (``past_key_values`` is deprecated there)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def describe(self) -> dict[str, Any]:
        return {"transformers": self.version, "attn_implementation": "sdpa",
                "logits_to_keep": "logits_to_keep" in self._forward_kwargs,
                "dtype": dtype_name(self.model.dtype), "threads": torch.get_num_threads()}

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # transformers < 4.56 takes no config
            return DynamicCache()

    @torch.inference_mode()
    def _next_token(self, token_ids: list[int], cache: Any) -> int:
        ids = torch.tensor([token_ids], dtype=torch.long)  # [1, num_tokens]
        out = self.model(input_ids=ids, **{self._cache_kw: cache}, **self._forward_kwargs)
        return int(out.logits[0, -1].argmax())

    def cold_ttft(self, prompt_ids: list[int]) -> tuple[float, int]:
        """(seconds, first token) for the whole prompt from an empty cache."""
        start = time.perf_counter()
        token = self._next_token(prompt_ids, self._new_cache())
        return time.perf_counter() - start, token

    def prefill(self, prefix_ids: list[int]) -> Any:
        """A ``DynamicCache`` holding ``prefix_ids`` (built untimed, once per shared prefix)."""
        cache = self._new_cache()
        self._next_token(prefix_ids, cache)
        if cache.get_seq_length() != len(prefix_ids):  # a renamed cache argument would be ignored silently
            raise RuntimeError(f"transformers {self.version} left the DynamicCache passed as {self._cache_kw!r} empty")
        return cache

    def warm_ttft(self, prefix_cache: Any, suffix_ids: list[int]) -> tuple[float, float, int]:
        """(seconds, copy seconds, first token) for the suffix on a copy of the prefix's cache.

        The copy is made *outside* the timed region: the TTFT is the suffix forward alone, the
        lower bound of manual reuse; what the copy costs on top is reported separately.
        """
        start = time.perf_counter()
        cache = copy.deepcopy(prefix_cache)
        copy_s = time.perf_counter() - start
        start = time.perf_counter()
        token = self._next_token(suffix_ids, cache)
        return time.perf_counter() - start, copy_s, token

    @torch.inference_mode()
    def decode_tokens_per_s(self, prompts: list[list[int]], output_tokens: int) -> float:
        """Greedy decode of a batch of equal-length prompts (no padding needed) with one
        ``DynamicCache``; generated tokens/s after the first token, over the whole batch."""
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("the transformers decode baseline takes prompts of one length")
        cache = self._new_cache()
        ids = torch.tensor(prompts, dtype=torch.long)  # [batch, prompt_len]
        tokens = self.model(input_ids=ids, **{self._cache_kw: cache}, **self._forward_kwargs).logits[:, -1].argmax(-1)
        start = time.perf_counter()
        for _ in range(output_tokens - 1):
            out = self.model(input_ids=tokens.unsqueeze(1), **{self._cache_kw: cache}, **self._forward_kwargs)
            tokens = out.logits[:, -1].argmax(-1)
        return len(prompts) * (output_tokens - 1) / (time.perf_counter() - start)
