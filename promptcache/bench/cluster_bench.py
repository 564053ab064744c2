"""``--workload multi-replica``: multi-tenant, multi-turn traffic through the ingress of N engine
replicas on Ray Serve, with our routing policy, round-robin and prefix-hash routing, in one run.

Each of ``tenants`` tenants (its own API key: its own cache namespace) has a system prompt of
``prefix_tokens``; each of its ``users`` holds a conversation of ``rounds`` rounds (a question of
``question_tokens``, an answer of ``output_tokens`` generated), all conversations at once, each
last round sent once more right after it returns (the *immediate resend*). Every routing mode gets the
same token ids, a fresh deployment and its own tenant names (so no mode reuses another's blocks,
in memory or in Redis). Reported per mode: total time, token hit rate (cached / prompt tokens,
resends excluded), how often a resend hit fully, and the load per replica (prompt tokens it
served) relative to the mean.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from promptcache.bench.machine import free_port
from promptcache.bench.workloads import TokenSource

MODES = ("policy", "round_robin", "prefix_hash")


class MultiReplica:
    def __init__(self, tenants: int = 4, users: int = 2, rounds: int = 6, prefix_tokens: int = 256,
                 question_tokens: int = 128, output_tokens: int = 16, replicas: int = 2, seed: int = 0) -> None:
        if min(tenants, users, rounds, replicas) < 1:
            raise ValueError("tenants, users, rounds and replicas must be >= 1")
        self.tenants, self.users, self.rounds = tenants, users, rounds
        self.prefix_tokens, self.question_tokens, self.output_tokens = prefix_tokens, question_tokens, output_tokens
        self.replicas, self.seed = replicas, seed

    def params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("tenants", "users", "rounds", "prefix_tokens", "question_tokens",
                                              "output_tokens", "replicas", "seed")}

    def _conversations(self) -> list[tuple[int, list[int], list[list[int]], list[list[int]]]]:
        """(tenant, system prompt, questions, answers-as-sent) per conversation: the same in every mode."""
        src = TokenSource(self.seed + 40_000)
        systems = [src.take(self.prefix_tokens) for _ in range(self.tenants)]
        out = []
        for t in range(self.tenants):
            for _ in range(self.users):
                questions = [src.take(self.question_tokens) for _ in range(self.rounds)]
                answers = [src.take(self.output_tokens) for _ in range(self.rounds)]
                out.append((t, systems[t], questions, answers))
        return out

    def run(self, engine_config: Any, cpus: int, progress: bool = True) -> dict[str, Any]:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        from promptcache.cluster import serve_app

        threads = max(1, cpus // self.replicas)
        ray.init(num_cpus=max(cpus, self.replicas), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        results: dict[str, Any] = {}
        port = free_port()  # Serve's HTTP proxy starts once, on this port, for every mode
        try:
            for mode in MODES:
                keys = {f"sk-{mode}-{t}": f"{mode}-tenant{t}" for t in range(self.tenants)}
                app = serve_app.build(engine_config, self.replicas, {"api_keys": keys}, routing=mode,
                                      cpus_per_replica=cpus / self.replicas, threads_per_replica=threads)
                serve_app.start_local(app, "127.0.0.1", port)
                try:
                    results[mode] = self._drive(f"http://127.0.0.1:{port}", list(keys), progress, mode)
                finally:
                    from ray import serve

                    serve.delete(serve_app.APP_NAME)
        finally:
            serve_app.stop_local()
        rr, policy = results["round_robin"], results["policy"]
        return {
            "modes": results,
            "threads_per_replica": threads,
            "hit_rate_vs_round_robin": policy["token_hit_rate"] / rr["token_hit_rate"] if rr["token_hit_rate"]
            else None,
            "time_vs_round_robin": policy["total_s"] / rr["total_s"],
        }

    def _drive(self, url: str, keys: list[str], progress: bool, mode: str) -> dict[str, Any]:
        import httpx

        convs = self._conversations()
        lock = threading.Lock()
        rows: list[dict[str, Any]] = []

        def send(client: httpx.Client, key: str, prompt: list[int], resend: bool) -> None:
            r = client.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {key}"}, json={
                "model": model, "prompt": prompt, "max_tokens": self.output_tokens, "temperature": 0.0,
                "ignore_eos": True})
            r.raise_for_status()
            usage = r.json()["usage"]
            with lock:
                rows.append({"replica": r.headers.get("x-promptcache-replica"), "resend": resend,
                             "prompt": usage["prompt_tokens"],
                             "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0})

        def converse(conv: tuple[int, list[int], list[list[int]], list[list[int]]]) -> None:
            tenant, system, questions, answers = conv
            prompt = list(system)
            with httpx.Client(timeout=600) as client:
                for q, a in zip(questions, answers, strict=True):
                    prompt += q
                    send(client, keys[tenant], prompt, resend=False)
                    prompt += a
                send(client, keys[tenant], prompt[: len(prompt) - len(a)], resend=True)  # the last round, again

        model = _wait_ready(url, keys[0])
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(convs)) as pool:
            list(pool.map(converse, convs))
        total = time.perf_counter() - started
        first = [r for r in rows if not r["resend"]]
        resends = [r for r in rows if r["resend"]]
        block = 16
        load: dict[str, int] = {}
        for r in rows:
            load[r["replica"]] = load.get(r["replica"], 0) + r["prompt"] - r["cached"]
        mean = sum(load.values()) / max(1, self.replicas)
        if progress:
            print(f"multi-replica: {mode}: {total:.1f} s", flush=True)
        return {
            "total_s": round(total, 3),
            "requests": len(rows),
            "token_hit_rate": sum(r["cached"] for r in first) / max(1, sum(r["prompt"] for r in first)),
            "resend_full_hit_rate": sum(r["cached"] >= (r["prompt"] - 1) // block * block for r in resends)
            / max(1, len(resends)),
            "computed_tokens_by_replica": load,
            "max_load_vs_mean": max(load.values()) / mean if mean else None,
        }


def _wait_ready(url: str, key: str, timeout_s: float = 120.0) -> str:
    """The served model's id, once the cluster answers."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5)
            if r.status_code == 200:
                return str(r.json()["data"][0]["id"])
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the cluster at {url} did not answer in {timeout_s:.0f} s")


def multi_replica_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """issue 16's targets (2 replicas, vs round-robin, one run)."""
    policy = result["modes"]["policy"]
    hit, time_ratio = result["hit_rate_vs_round_robin"] or 0.0, result["time_vs_round_robin"]
    resend, load = policy["resend_full_hit_rate"], policy["max_load_vs_mean"] or 0.0
    return [
        {"name": "token hit rate, policy / round-robin", "value": hit, "limit": 3.0, "op": "≥", "met": hit >= 3.0},
        {"name": "total time, policy / round-robin", "value": time_ratio, "limit": 0.6, "met": time_ratio <= 0.6},
        {"name": "immediate resends that hit fully (policy)", "value": resend, "limit": 1.0, "op": "=",
         "met": resend == 1.0},
        {"name": "busiest replica's computed tokens / mean (policy)", "value": load, "limit": 1.25,
         "met": load <= 1.25},
    ]
