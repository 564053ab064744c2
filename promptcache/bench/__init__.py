"""``promptcache bench``: prompt-caching benchmarks on the in-process engine or any OpenAI server.

Layout: ``workloads`` (token-id prompts), ``backends`` / ``http_client`` (where requests go),
``runner`` (arms and throughput), ``prefix_pair`` (the cold/warm/suffix-only protocol),
``baselines`` (transformers), ``machine`` (GEMM FLOP/s, model FLOPs, memory), ``report``
(Markdown, JSON, plot), ``suite`` (one run), ``cli`` (the subcommand).
"""
