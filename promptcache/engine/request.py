"""A request's state as it moves through the engine, and what the engine reports back."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from promptcache.cache import NO_RETENTION, BlockHash, Retention, hash_blocks
from promptcache.cache.hashing import DEFAULT_HASH_SEED
from promptcache.engine.sampling import SamplingParams
from promptcache.engine.usage import Usage


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclass
class RequestOutput:
    """One step's news about a request (``LLM.generate`` returns the final, cumulative one)."""

    request_id: str
    prompt_token_ids: list[int]
    text: str  # all generated text so far (cumulative)
    token_ids: list[int]  # all generated token ids so far (cumulative)
    new_text: str  # the text this step added (for streaming)
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    usage: Usage
    logprobs: list[TokenLogprob] | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    served_by: str | None = None  # the replica that ran it (set by cluster/; None on a single server)


@dataclass(frozen=True)
class RequestSpec:
    """What a caller asks for — the one shape in which ``LLM``, ``AsyncEngine`` and the server hand
    a request to ``LLMEngine``. The tenant is decided by the server (from the API key), never read
    from a request body; it only selects the cache namespace."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    tenant: str | None = None
    retention: Retention = NO_RETENTION
    cache_key: str | None = None  # the client's prompt_cache_key: a routing hint for cluster/, unused here


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        root_hash: BlockHash,
        block_size: int,
        retention: Retention,
        hash_seed: bytes = DEFAULT_HASH_SEED,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.all_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.retention = retention
        self.status = Status.WAITING
        self.first_scheduled_time: float | None = None
        self.wait_started: float | None = None  # when it began waiting for in-flight blocks
        # [0, hit at this admission) reused | [.., num_computed_tokens) computed | [.., num_tokens) to run;
        # a preemption resets num_computed_tokens to 0 and the next admission takes a new hit
        # (usage.cached_tokens keeps the first one: engine/usage.py)
        self.num_computed_tokens = 0
        self.usage = Usage()
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self._root, self._block_size, self._seed = root_hash, block_size, hash_seed
        self.block_hashes: list[BlockHash] = hash_blocks(root_hash, self.all_token_ids, block_size, seed=hash_seed)
        self.num_preemptions = 0
        self.written_blocks: set[int] = set()  # prompt block indices this request stored first
        self.tier_probed = False  # the tiers below memory were asked for its prefix (engine/tiering.py)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_blocks(self) -> int:
        return self.num_prompt_tokens // self._block_size

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.num_tokens % self._block_size == 0:  # a generated block just filled up: hash it
            parent = self.block_hashes[-1] if self.block_hashes else None
            self.block_hashes.extend(
                hash_blocks(
                    self._root,
                    self.all_token_ids,
                    self._block_size,
                    start_block=len(self.block_hashes),
                    parent=parent,
                    seed=self._seed,
                )
            )
