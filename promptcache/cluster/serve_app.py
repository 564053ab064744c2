"""promptcache on Ray Serve: an ingress deployment (the FastAPI app: dialects, auth, tokenizing,
hashing) that calls an engine deployment of N replicas through a deployment handle, with
``router.CacheAwareRouter`` as the engine deployment's request router.

``build(...)`` returns the bound application (for ``serve.run`` or a Serve config file's
``import_path``: see docs/cluster.md); ``run_local(...)`` starts Ray on this machine, serves it
over HTTP and blocks (``promptcache serve --replicas N``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from promptcache.cluster.router import STATS_PERIOD_S, CacheAwareRouter
from promptcache.cluster.shared import Route
from promptcache.engine.api import RequestOutput, RequestSpec

APP_NAME = "promptcache"
HEALTH_CHECK_PERIOD_S = 2.0  # how soon Serve notices a dead replica (routers notice at once)
MAX_ONGOING = 1024  # requests one replica takes at a time: the engine batches and queues them itself


class Engine:
    """One engine replica: builds its LLMEngine and AsyncEngine, serves ``generate``, reports
    ``record_routing_stats`` (Serve polls it every ``router.STATS_PERIOD_S``)."""

    def __init__(self, engine_config: Any, max_waiting: int, threads: int) -> None:
        import torch

        from promptcache.cluster.replica import EngineReplica
        from promptcache.engine.async_engine import AsyncEngine
        from promptcache.engine.llm_engine import LLMEngine

        if threads > 0:
            torch.set_num_threads(threads)
        name = serve.get_replica_context().replica_id.unique_id
        self.aengine = AsyncEngine(LLMEngine(engine_config), max_waiting=max_waiting)
        self.aengine.start()
        self.replica = EngineReplica(self.aengine, name)

    def describe(self) -> Any:
        return self.replica.describe()

    async def generate(self, spec: RequestSpec, route: Route | None = None) -> AsyncIterator[RequestOutput]:
        async for out in self.replica.generate(spec):  # a cancelled call closes this: the request aborts
            yield out

    async def record_routing_stats(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.replica.routing_stats)  # waits for a step: off the loop

    def __del__(self) -> None:
        aengine = getattr(self, "aengine", None)
        if aengine is not None:
            aengine.shutdown()


@serve.ingress()
class Ingress:
    """The FastAPI app of server/app.py, over ``RemoteEngine`` (its app is built per replica)."""

    def __init__(self, engine: Any, app_options: dict[str, Any]) -> None:
        self.engine, self.app_options = engine, app_options

    async def __serve_build_asgi_app__(self) -> Any:
        from promptcache.cluster.remote import RemoteEngine
        from promptcache.server.app import create_app

        facts = await self.engine.describe.remote()
        remote: Any = RemoteEngine(self.engine, facts)  # AsyncEngine's face, structurally
        return create_app(remote, **self.app_options)


def build(engine_config: Any, replicas: int, app_options: dict[str, Any] | None = None, routing: str = "policy",
          max_waiting: int = 256, cpus_per_replica: float = 1.0, threads_per_replica: int = 0) -> Any:
    """The bound application: ``replicas`` engines behind ``routing`` ("policy", "round_robin",
    "prefix_hash"), and one ingress."""
    router_config: Any = RequestRouterConfig  # a pydantic model whose signature mypy misreads
    router = router_config(
        request_router_class=CacheAwareRouter,
        request_router_kwargs={"mode": routing, "block_size": engine_config.cache.block_size},
        request_routing_stats_period_s=STATS_PERIOD_S,
        request_routing_stats_timeout_s=10.0,
    )
    deployment: Any = serve.deployment
    engine = deployment(Engine, name="Engine").options(
        num_replicas=replicas, max_ongoing_requests=MAX_ONGOING, request_router_config=router,
        ray_actor_options={"num_cpus": cpus_per_replica}, health_check_period_s=HEALTH_CHECK_PERIOD_S,
        graceful_shutdown_wait_loop_s=0.1, graceful_shutdown_timeout_s=5.0,
    )
    ingress = deployment(Ingress, name="Ingress").options(
        max_ongoing_requests=MAX_ONGOING * max(1, replicas), ray_actor_options={"num_cpus": 0},
        graceful_shutdown_wait_loop_s=0.1, graceful_shutdown_timeout_s=5.0,
    )
    return ingress.bind(engine.bind(engine_config, max_waiting, threads_per_replica), app_options or {})


def start_local(app: Any, host: str, port: int, num_cpus: int | None = None) -> None:
    """Ray on this machine (no dashboard, no usage reporting), Serve's HTTP proxy on host:port."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)


def stop_local() -> None:
    import ray

    serve.shutdown()
    ray.shutdown()
