"""``promptcache serve --replicas N``, as a user runs it: Ray starts on this machine, the banner
comes once the cluster answers, requests name their replica, SIGTERM shuts Ray down cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from redis_server import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_serve_with_replicas_starts_ray_routes_and_stops(tmp_path) -> None:
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "promptcache.cli", "serve", "--model", "random:tiny", "--dtype", "float32",
         "--kv-cache-memory", "4MiB", "--replicas", "1", "--cpus-per-replica", "0.5", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 180
        banner = ""
        assert proc.stdout is not None
        while time.monotonic() < deadline and "serving 1 replica(s) on Ray Serve" not in banner:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            banner += line
        assert "routing: policy" in banner, banner
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "random:tiny", "prompt": "hello there", "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert r.headers["x-promptcache-replica"] and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, out


def test_replicas_without_a_free_port_is_one_line(tmp_path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "promptcache.cli", "serve", "--model", "random:tiny", "--replicas",
                            "2", "--port", str(port)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode != 0 and "cannot listen on" in r.stderr and "Ray" not in r.stdout + r.stderr
