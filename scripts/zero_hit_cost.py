import sys; sys.path.insert(0, '/work/main')
import torch; torch.set_num_threads(2)
from promptcache.bench.backends import EngineBackend
from promptcache.bench.workloads import SharedPrefix
from promptcache.bench.runner import run_workload
from promptcache.engine.config import EngineConfig, ModelConfig
from promptcache.engine.llm_engine import LLMEngine
cfg = EngineConfig(model=ModelConfig(model='/tmp/smollm2', dtype='bfloat16'))
on = EngineBackend(LLMEngine(cfg.replace(enable_prefix_caching=True)), "cache")
off = EngineBackend(LLMEngine(cfg.replace(enable_prefix_caching=False)), "no-cache")
wl = SharedPrefix(groups=16, questions=1, prefix_tokens=512)
for order in (("no-cache", "cache"), ("cache", "no-cache"), ("no-cache", "cache"), ("cache", "no-cache")):
    arms = {"cache": on, "no-cache": off}
    r = run_workload(wl, {a: arms[a] for a in order}, progress=False)
    print(order, {a: round(r["arms"][a]["total_s"], 2) for a in order})
