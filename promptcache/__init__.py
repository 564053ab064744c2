"""promptcache: a self-hosted prompt-caching LLM engine and server."""

from promptcache.engine.config import EngineConfig
from promptcache.engine.llm import LLM
from promptcache.engine.request import RequestOutput, RequestSpec
from promptcache.engine.sampling import SamplingParams
from promptcache.engine.usage import Usage

__all__ = ["LLM", "EngineConfig", "RequestOutput", "RequestSpec", "SamplingParams", "Usage"]
__version__ = "0.1.0"
