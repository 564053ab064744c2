"""promptcache: a self-hosted prompt-caching LLM engine and server."""

import os as _os

# oneDNN (16-bit matmuls on CPUs with native bf16/fp16) and its ideep wrapper JIT-compile kernels
# for every new matrix shape and keep up to 1,024 of each (~0.6 MB apiece). Continuous batching
# runs a new token count nearly every step, so a server's RSS grew by 1.3 GB under load and never
# came back (RSS growth of issue 13). Bounded here unless the user chose: both are read when
# oneDNN first runs, so this must precede any matmul (docs/architecture.md, "Decisions").
CPU_KERNEL_CACHE_ENTRIES = 64
for _name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    _os.environ.setdefault(_name, str(CPU_KERNEL_CACHE_ENTRIES))

from promptcache.engine.config import EngineConfig
from promptcache.engine.llm import LLM
from promptcache.engine.request import RequestOutput, RequestSpec
from promptcache.engine.sampling import SamplingParams
from promptcache.engine.usage import Usage

__all__ = ["LLM", "EngineConfig", "RequestOutput", "RequestSpec", "SamplingParams", "Usage"]
__version__ = "0.1.0"
