"""The HTTP server's settings: one frozen config owning its ``promptcache serve`` flags."""

from __future__ import annotations

from dataclasses import dataclass

from promptcache.flags import opt, parse_bytes

DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20
DEFAULT_BODY_TIMEOUT_S = 60.0
DEFAULT_DIAGNOSIS_HISTORY = 64
DEFAULT_OUTPUT_CAP = 4096  # a request without max_tokens once generated 600 s to the end of the context
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
ROUTING_MODES = ("policy", "round_robin", "prefix_hash")  # cluster/router.py MODES


@dataclass(frozen=True)
class ServerConfig:
    host: str = opt("127.0.0.1", "interface to bind (0.0.0.0 for all)")
    port: int = opt(8000, "TCP port")
    api_keys: str | None = opt(None, 'JSON file mapping API keys to tenant names, e.g. {"sk-a": "acme"}; each '
                               "tenant is its own cache namespace. Without it the server is open and "
                               "single-tenant.", metavar="FILE")
    admin_keys: str | None = opt(None, 'JSON list of operator keys, e.g. ["sk-ops-1"]: with --api-keys, /metrics '
                                 "and the details of /health (every tenant's traffic) need one of them",
                                 metavar="FILE")
    max_waiting: int = opt(256, "queued requests before new ones get 429 with Retry-After")
    max_request_bytes: int = opt(DEFAULT_MAX_REQUEST_BYTES, "largest request body accepted (e.g. 32MiB, 1MB, a "
                                 "byte count); larger ones get 413", parse=parse_bytes, metavar="SIZE")
    body_timeout_s: float = opt(DEFAULT_BODY_TIMEOUT_S, "seconds a client has to send its whole request "
                                "body; later it gets 408 (a trickled partial body cannot hold a connection)")
    served_model_name: tuple[str, ...] | None = opt(
        None, "model id clients send and /v1/models lists (repeatable; default: --model or 'default')",
        metavar="NAME", append=True,
    )
    log_level: str = opt("info", "uvicorn's log level", choices=LOG_LEVELS)
    default_max_tokens: int = opt(DEFAULT_OUTPUT_CAP, "tokens generated for an OpenAI request that sends no "
                                  "max_tokens (0: to the end of the context)", metavar="N")
    diagnosis_history: int = opt(DEFAULT_DIAGNOSIS_HISTORY, "recent prompts kept per tenant to explain cache misses "
                                 "(x-promptcache-diagnose, comparison_response_id, previous_message_id); 0 keeps "
                                 "none", metavar="N")
    max_pinned_tokens: int | None = opt(None, "tokens of Gemini cached contents each tenant may hold pinned in "
                                        "memory (default: half the KV cache)", metavar="N")
    prices: str | None = opt(None, "JSON file of prices per million tokens for the cost fields (default: "
                             "provider-like ratios, docs/server.md)", metavar="FILE")
    replicas: int = opt(0, "engine replicas on Ray Serve behind cache-aware routing (pip install "
                        "'promptcache[cluster]'; with --redis-url they share prefixes); 0: one engine in this "
                        "process, no Ray", metavar="N")
    routing: str = opt("policy", "how --replicas routes requests: policy (cache- and load-aware), or the "
                       "baselines round_robin and prefix_hash", choices=ROUTING_MODES)
    cpus_per_replica: float = opt(1.0, "CPUs Ray reserves for each engine replica (with --replicas)", metavar="N")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        if not 0 < self.body_timeout_s < float("inf"):
            raise ValueError("body_timeout_s must be a positive number of seconds")
        if self.max_request_bytes < 1:
            raise ValueError("max_request_bytes must be at least 1 byte")
        if self.default_max_tokens < 0:
            raise ValueError("default_max_tokens must be >= 0")
        if self.max_pinned_tokens is not None and self.max_pinned_tokens < 0:
            raise ValueError("max_pinned_tokens must be >= 0")
        if self.diagnosis_history < 0:
            raise ValueError("diagnosis_history must be >= 0")
        if self.replicas < 0:
            raise ValueError("replicas must be >= 0")
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {', '.join(ROUTING_MODES)}")
        if not self.cpus_per_replica >= 0:
            raise ValueError("cpus_per_replica must be >= 0")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
