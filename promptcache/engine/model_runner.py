"""The one place that sees both block ids and tensors.

Owns the model and the paged KV storage; turns a step's scheduled chunks into a flat token batch
plus attention metadata, runs the model, and samples where a chunk reaches its request's end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from promptcache.engine.config import EngineConfig
from promptcache.engine.host import tune_malloc
from promptcache.engine.precision import compute_dtype_for, pick_device, pick_dtype
from promptcache.engine.request import TokenLogprob
from promptcache.engine.sampler import Sampler
from promptcache.engine.sampling import SamplingParams
from promptcache.flags import parse_bytes
from promptcache.model.attention import AttentionMetadata, output_rows, runs_of_blocks, slots_after
from promptcache.model.backends import AttentionBackend, pick_backend
from promptcache.model.loader import LoadedModel, load_model, resolve_model_dir

MAX_DEFAULT_MODEL_LEN = 32768


@dataclass(frozen=True)
class SeqInput:
    """One request's slice of a step, as plain data (no request object crosses into tensors)."""

    request_id: str
    token_ids: list[int]  # the tokens to run this step
    start_pos: int  # position of token_ids[0]; [0, start_pos) are already in the cache
    block_ids: list[int]  # the request's block table, covering at least start_pos + len(token_ids)
    sample: bool  # this chunk ends at the request's last token: sample the next one
    params: SamplingParams


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n < 2**40 else f"{n / 2**40:,.1f} TiB"


def machine_memory(device: torch.device) -> tuple[int, int] | None:
    """(total, available) bytes of the memory the KV cache would live in; None if unknown."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(total), int(free)
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    available = total
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    return total, available


def check_memory_budget(kv_bytes: int, device: torch.device, asked: int | str) -> None:
    """Refuse, in one line, a KV cache the machine cannot hold (the allocator's own failure is a
    traceback, or on Linux a lazily touched allocation that dies later under the OOM killer)."""
    memory = machine_memory(device)
    if memory is None:
        return
    total, available = memory
    if kv_bytes > available:
        where = "the GPU" if device.type == "cuda" else "this machine"
        raise ValueError(f"--kv-cache-memory {asked} asks for {_gib(kv_bytes)} of KV cache; {where} has "
                         f"{_gib(total)} of memory ({_gib(available)} available). Lower --kv-cache-memory.")


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        if config.model.device in ("auto", "cpu") and not os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(max(1, os.cpu_count() or 1))
        self.device = pick_device(config.model.device)
        if self.device.type == "cpu":
            tune_malloc()  # a step's large temporaries reuse heap pages, not fresh mmaps (engine/host.py)
        self.dtype = pick_dtype(config.model.dtype, self.device)  # what the user asked for (weights' values)
        self.compute_dtype = compute_dtype_for(self.dtype, self.device, config.model.compute_dtype)
        # The KV cache holds what attention reads: by default the compute dtype (no conversion on
        # the hot path); a 16-bit cache on a float32-compute CPU doubles capacity for a small cost.
        self.kv_dtype = (
            self.compute_dtype
            if config.model.kv_cache_dtype == "auto"
            else pick_dtype(config.model.kv_cache_dtype, self.device)
        )
        self.model_dir = resolve_model_dir(config.model.model)
        max_len = config.model.max_model_len or MAX_DEFAULT_MODEL_LEN
        self.loaded: LoadedModel = load_model(
            self.model_dir, self.compute_dtype, self.device, max_len, value_dtype=self.dtype,
            deterministic=config.model.deterministic,
        )
        arch = self.loaded.arch
        self.max_model_len = self.loaded.model.max_model_len  # clamped to the checkpoint's positions
        self.block_size = config.cache.block_size
        elem = torch.finfo(self.kv_dtype).bits // 8
        self.kv_bytes_per_token = arch.kv_elements_per_token * elem
        self.num_blocks = config.cache.num_blocks or max(
            1, parse_bytes(config.cache.kv_cache_memory) // (self.kv_bytes_per_token * self.block_size)
        )
        num_slots = self.num_blocks * self.block_size
        check_memory_budget(self.kv_cache_bytes, self.device, config.cache.kv_cache_memory)
        # per layer [2 (k, v), kv_heads, num_slots, head_dim]; torch.empty: pages are touched lazily
        self.kv_caches = [
            torch.empty(2, arch.num_kv_heads, num_slots, arch.head_dim, dtype=self.kv_dtype, device=self.device)
            for _ in range(arch.num_layers)
        ]
        self.sampler = Sampler(config.scheduler.seed)
        # the last layer's attention, projection and MLP for the rows that sample only (``OutputRows``);
        # False computes every row (the reference the tests compare with)
        self.last_layer_rows_only = True
        self.attention: AttentionBackend = pick_backend(self.device, config.model.deterministic, self.compute_dtype,
                                                        arch.head_dim)

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self.block_size * self.kv_bytes_per_token

    def execute(self, seqs: list[SeqInput]) -> dict[str, tuple[int, TokenLogprob | None]]:
        """Run one step; returns the sampled token (and logprobs) of every sequence that samples."""
        input_ids: list[int] = []
        positions: list[int] = []
        new_slots: list[int] = []
        context_runs, seq_lens, starts = [], [], [0]
        for s in seqs:
            end = s.start_pos + len(s.token_ids)
            input_ids.extend(s.token_ids)
            positions.extend(range(s.start_pos, end))
            runs = runs_of_blocks(s.block_ids, end, self.block_size)
            context_runs.append(runs)
            new_slots.extend(slots_after(runs, s.start_pos))
            seq_lens.append(end)
            starts.append(starts[-1] + len(s.token_ids))
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(new_slots, dtype=torch.long, device=self.device),
            query_start_loc=starts,
            seq_lens=seq_lens,
            context_runs=context_runs,
            num_kv_heads=self.loaded.arch.num_kv_heads,
            backend=self.attention,
        )
        rows = [i for i, s in enumerate(seqs) if s.sample]
        # the last layer computes only the rows that sample (every row's K/V still stored)
        attn.outputs = output_rows(attn, rows) if self.last_layer_rows_only else None
        self.attention.prepare(attn, self.loaded.arch.num_heads, self.compute_dtype, self.device)
        if attn.outputs is not None and attn.outputs.attn is not None:
            self.attention.prepare(attn.outputs.attn, self.loaded.arch.num_heads, self.compute_dtype, self.device)
        ids_t = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos_t = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.loaded.model(ids_t, pos_t, attn, self.kv_caches)  # the sampling rows (or all)
        if not rows:
            return {}
        if attn.outputs is None and len(rows) != len(input_ids):  # every row computed: keep each sampler's last
            hidden = hidden.index_select(0, torch.tensor([starts[i + 1] - 1 for i in rows], device=self.device))
        logits = self.loaded.model.compute_logits(hidden)  # [len(rows), vocab]
        tokens, logprobs = self.sampler.sample(
            logits, [seqs[i].request_id for i in rows], [seqs[i].params for i in rows]
        )
        return {seqs[i].request_id: (tokens[j], logprobs[j]) for j, i in enumerate(rows)}

    def synchronize(self) -> None:
        """Wait for the device's queued work (a no-op on CPUs)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- block bytes, for the tiers below memory (engine/tiering.py) -----------------------------

    @property
    def block_bytes(self) -> int:
        """Bytes of one block's K/V over every layer: ``[layers, 2, kv_heads, block_size, head_dim]``."""
        return self.kv_bytes_per_token * self.block_size

    def _block_runs(self, kv: torch.Tensor, block_ids: list[int]) -> list[tuple[int, torch.Tensor]]:
        """One layer's storage seen as ``[2, kv_heads, blocks, block_size, head_dim]``, cut into
        views of ``block_ids``' runs of consecutive ids (fresh blocks usually are one run):
        ``(index of the run's first block in block_ids, view)``."""
        arch = self.loaded.arch
        per_block = kv.view(2, arch.num_kv_heads, self.num_blocks, self.block_size, arch.head_dim)
        runs: list[tuple[int, torch.Tensor]] = []
        i = 0
        while i < len(block_ids):
            j = i + 1
            while j < len(block_ids) and block_ids[j] == block_ids[j - 1] + 1:
                j += 1
            runs.append((i, per_block[:, :, block_ids[i] : block_ids[i] + j - i]))
            i = j
        return runs

    def read_blocks(self, block_ids: list[int]) -> list[memoryview]:
        """Each block's K/V as host bytes, laid out ``[layers, 2, kv_heads, block_size, head_dim]``
        (one strided copy per layer and run of consecutive blocks, into one host buffer)."""
        if not block_ids:
            return []
        n, arch = len(block_ids), self.loaded.arch
        host = torch.empty(n, arch.num_layers, 2, arch.num_kv_heads, self.block_size, arch.head_dim,
                           dtype=self.kv_dtype)
        for layer, kv in enumerate(self.kv_caches):
            for i, view in self._block_runs(kv, block_ids):
                host[i : i + view.shape[2], layer].copy_(view.permute(2, 0, 1, 3, 4))  # device -> host on a GPU
        flat = memoryview(host.view(torch.uint8).reshape(-1).numpy().data)
        bb = self.block_bytes
        return [flat[i * bb : (i + 1) * bb] for i in range(n)]

    def write_blocks(self, block_ids: list[int], payloads: list[memoryview]) -> None:
        """Fill blocks with K/V bytes laid out as ``read_blocks`` returns them (verified by the caller)."""
        if not block_ids:
            return
        n, arch, bb = len(block_ids), self.loaded.arch, self.block_bytes
        host = torch.empty(n * bb, dtype=torch.uint8)
        dst = host.numpy()
        for i, p in enumerate(payloads):
            dst[i * bb : (i + 1) * bb] = np.frombuffer(p, dtype=np.uint8)
        blocks = host.view(self.kv_dtype).view(n, arch.num_layers, 2, arch.num_kv_heads, self.block_size,
                                               arch.head_dim).to(self.device)
        for layer, kv in enumerate(self.kv_caches):
            for i, view in self._block_runs(kv, block_ids):
                view.copy_(blocks[i : i + view.shape[2], layer].permute(1, 2, 0, 3, 4))
