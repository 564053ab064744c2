"""``promptcache bench``: workload shapes, ideal reuse, and tiny end-to-end runs (no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from promptcache.bench.backends import RequestResult
from promptcache.bench.http_client import HttpBackend
from promptcache.bench.machine import percentile, prefill_flops
from promptcache.bench.prefix_pair import PrefixPair, run_prefix_pair
from promptcache.bench.report import markdown
from promptcache.bench.workloads import (
    TOKEN_HIGH,
    TOKEN_LOW,
    BenchRequest,
    LongDoc,
    MultiTurn,
    SharedPrefix,
    TokenSource,
    ideal_cached_tokens,
)
from promptcache.cli import main
from promptcache.model.config import arch_from_hf_config
from promptcache.model.shapes import SHAPES


def test_token_source_is_seeded_and_in_range():
    a, b = TokenSource(3).take(500), TokenSource(3).take(500)
    assert a == b and a != TokenSource(4).take(500)
    assert all(TOKEN_LOW <= t < TOKEN_HIGH for t in a)


def test_shared_prefix_wave_and_ideal_reuse():
    w = SharedPrefix(groups=2, questions=3, prefix_tokens=32, question_tokens=8, output_tokens=2)
    (wave,) = [w.wave(0, {})]
    assert [r.name for r in wave] == ["g0-q0", "g1-q0", "g0-q1", "g1-q1", "g0-q2", "g1-q2"]
    assert all(len(r.prompt_ids) == 40 for r in wave)
    assert wave[0].prompt_ids[:32] == wave[2].prompt_ids[:32] != wave[1].prompt_ids[:32]
    ideal = ideal_cached_tokens([[(r.prompt_ids, [1, 2]) for r in wave]])
    assert ideal == [[0, 0, 32, 32, 32, 32]]


def test_multi_turn_history_extends_previous_round():
    w = MultiTurn(users=2, rounds=3, prefix_tokens=16, question_tokens=4, output_tokens=3)
    r0 = w.wave(0, {})
    answers = {r.name: [7, 8, 9] for r in r0}
    r1 = w.wave(1, answers)
    assert r0[0].prompt_ids[:16] == r0[1].prompt_ids[:16]  # shared system prompt
    assert r1[0].prompt_ids[: 20 + 3] == r0[0].prompt_ids + [7, 8, 9]
    ideal = ideal_cached_tokens([[(r.prompt_ids, [7, 8, 9]) for r in r0], [(r.prompt_ids, [7, 8, 9]) for r in r1]])
    # round 0: the second user reuses the system prompt; round 1: prompt + answer but its last token
    assert ideal == [[0, 16], [20 + 2, 20 + 2]]
    assert len(w.wave(1, {})[0].prompt_ids) == 16 + 4 + 3 + 4  # text-only servers: seeded stand-ins


def test_long_doc_orders():
    tile = LongDoc(documents=2, doc_tokens=8, asks=2, question_tokens=2, order="tile")
    inter = LongDoc(documents=2, doc_tokens=8, asks=2, question_tokens=2, order="interleave")
    assert [tile.wave(i, {})[0].name for i in range(4)] == ["d0-k0", "d0-k1", "d1-k0", "d1-k1"]
    assert [inter.wave(i, {})[0].name for i in range(4)] == ["d0-k0", "d1-k0", "d0-k1", "d1-k1"]


def test_percentile_and_flops():
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([2.0], 95) == 2.0
    arch = arch_from_hf_config(SHAPES["tiny"])
    # causal: 4 new tokens after 0 cached see 1 + 2 + 3 + 4 keys
    attn = 4 * arch.num_layers * arch.num_heads * arch.head_dim * 10
    assert prefill_flops(arch, 4, logits_rows=0) == 2 * 4 * (arch.num_params - arch.vocab_size * 64) + attn


def _run(tmp_path: Path, *extra: str, greedy_may_differ: bool = False) -> dict:
    """Run the bench; it exits 0, or (16-bit default mode, where a near-tie may round either way
    with the cache on and off) 1 exactly when its report says greedy outputs differ."""
    out = tmp_path / "r.json"
    argv = [
        "bench", "--model", "random:tiny", "--dtype", "float32", "--kv-cache-memory", "4MiB", "--no-progress",
        "--json", str(out), "--decode-tokens", "3", "--decode-batch-sizes", "1", "2", "--decode-prompt-tokens",
        "16", "--prefill-tokens", "64", *extra,
    ]
    rc = main(argv)
    report = json.loads(out.read_text())
    assert rc == (1 if greedy_may_differ and report.get("greedy_match") is False else 0)
    return report


def test_bench_shared_prefix_end_to_end(tmp_path, capsys):
    plot = tmp_path / "ttft.png"
    r = _run(tmp_path, "--workload", "shared-prefix", "--groups", "2", "--questions", "3", "--prefix-tokens", "64",
             "--question-tokens", "8", "--output-tokens", "3", "--plot", str(plot))
    assert r["greedy_match"] is True and r["greedy_mismatches"] == []
    on, off = r["arms"]["cache"], r["arms"]["no-cache"]
    assert on["requests"] == off["requests"] == 6
    assert on["prompt_tokens"] == off["prompt_tokens"] == 6 * 72
    assert on["cached_tokens"] == 4 * 64 and off["cached_tokens"] == 0  # block-aligned prefix, 4 hits
    assert on["ideal_cached_tokens"] == 4 * 64 and on["output_tokens"] == 18
    # every uncached prompt token runs once, plus each stream's decode steps (the last token never runs)
    assert on["computed_tokens"] == 6 * 72 - 4 * 64 + 6 * 2 and off["computed_tokens"] == 6 * 72 + 6 * 2
    assert [x["cached_tokens"] for x in r["requests"]["cache"]] == [0, 0, 64, 64, 64, 64]
    for key in ("decode_tokens_per_s_b1", "decode_tokens_per_s_b2", "prefill_tokens_per_s", "mfu",
                "gemm_flops_per_s", "peak_rss_bytes", "speedup_total"):
        assert r[key] > 0, key
    assert r["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 kv heads, dim 16, fp32
    assert plot.stat().st_size > 0
    assert "| cache | 6 |" in capsys.readouterr().out


def test_bench_prefix_pair_with_transformers(tmp_path):
    r = _run(tmp_path, "--workload", "prefix-pair", "--prompt-tokens", "96", "--suffix-tokens", "32",
             "--repeats", "1", "--output-tokens", "3", "--baseline", "transformers")
    for key in ("cold_ttft_s", "warm_ttft_s", "suffix_only_ttft_s", "transformers_cold_ttft_s",
                "transformers_warm_ttft_s", "transformers_cache_copy_s", "transformers_decode_tokens_per_s_b1"):
        assert r[key] > 0, key
    assert r["cached_tokens"] == 64 and r["greedy_match"] is True
    assert {t["name"] for t in r["targets"]} >= {"warm TTFT / suffix-only TTFT",
                                                 "warm / suffix-only TTFT over its FLOP floor"}
    floor = r["warm_flops_over_suffix_only_flops"]
    assert floor > 1 and r["warm_over_suffix_only_vs_floor"] == r["warm_over_suffix_only"] / floor
    assert r["transformers"]["logits_to_keep"] is True


class _ServerLike:
    """A backend whose cache cannot be reset (a server): records the prompts it is sent."""

    name, can_reset = "server-like", False

    def __init__(self) -> None:
        self.prompts: list[tuple[int, ...]] = []

    def run_wave(self, requests, on_done=None):
        self.prompts += [tuple(r.prompt_ids) for r in requests]
        return [RequestResult(r.name, len(r.prompt_ids), 0, [1], "", 1, 0.1, 0.1) for r in requests]


def test_prefix_pair_repeats_over_http_never_share_prompts():
    """A server's cache cannot be reset, so each repeat takes fresh ids: none of a run's prompts may
    come back in a run at a nearby ``--seed`` (they would be cached, and "cold" would read a hit).
    Runs the protocol itself (``run_prefix_pair``) against a server-like backend."""
    sent = []
    for seed in (7, 8, 9):
        backend = _ServerLike()
        run_prefix_pair(PrefixPair(prompt_tokens=48, suffix_tokens=16, repeats=3, seed=seed), backend,
                        progress=False)
        sent.append([p for p in backend.prompts[1:]])  # after the warm-up request
    prompts = [p for run in sent for p in run]
    assert len(prompts) == 27 and len(set(prompts)) == 27  # cold, warm, suffix-only x 3 repeats x 3 seeds
    assert len({p[:32] for p in prompts}) == 18  # each repeat's cold and warm prompts share their prefix


class _Logged(_ServerLike):
    """A server-like backend that writes who was sent what, in order, to a log shared with another."""

    def __init__(self, name: str, log: list, ttft_s: float) -> None:
        super().__init__()
        self.name, self.log, self.ttft_s = name, log, ttft_s

    def run_wave(self, requests, on_done=None):
        self.log += [(self.name, r.name, tuple(r.prompt_ids)) for r in requests]
        return [RequestResult(r.name, len(r.prompt_ids), 0, [len(self.log) % 2], "", 1, self.ttft_s, self.ttft_s)
                for r in requests]

    def describe(self):
        return {"backend": "http", "url": self.name}


def test_prefix_pair_alternates_with_a_peer_request_by_request():
    """``--peer-url``: the peer gets the same ids as ours, each request right after (or, every other
    repeat, right before) ours, so a slow phase of the host hits both; ratios come per repeat."""
    log: list = []
    ours, peer = _Logged("ours", log, 0.2), _Logged("peer", log, 0.5)
    waits = []

    def settle() -> float:  # the host goes quiet at once, after either side
        waits.append(len(log))
        return 0.25 if log[-1][0] == "peer" else 0.0

    report = run_prefix_pair(PrefixPair(prompt_tokens=48, suffix_tokens=16, repeats=3, seed=3), ours,
                             progress=False, peer=peer, settle=settle)
    assert [who for who, _, _ in log[:2]] == ["ours", "peer"]  # each warmed up
    timed = log[2:]
    assert len(timed) == 3 * 3 * 2
    assert waits == list(range(2, 2 + len(timed)))  # before every timed request
    assert report["quiet_wait_s"] == {"after ours": 0.0, "after the peer": 0.25}
    for i in range(0, len(timed), 2):
        (a, name_a, ids_a), (b, name_b, ids_b) = timed[i], timed[i + 1]
        repeat = i // 6
        assert (a, b) == (("ours", "peer") if repeat % 2 == 0 else ("peer", "ours"))
        assert ids_a == ids_b  # the same ids, back to back
        assert name_a.removeprefix("peer-") == name_b.removeprefix("peer-")
    kinds = [name.split("-")[-2] for who, name, _ in timed if who == "ours"]
    assert kinds == ["cold", "warm", "suffix"] * 3
    assert len({ids for _, _, ids in timed}) == 9  # fresh ids per repeat, on both sides
    assert report["warm_over_peer_warm"] == report["cold_over_peer_cold"] == 0.2 / 0.5
    assert report["warm_over_peer_warm_per_repeat"] == report["cold_over_peer_cold_per_repeat"] == [0.2 / 0.5] * 3
    assert report["peer_warm_ttft_s"] == 0.5 and report["arms"]["peer warm"]["requests"] == 3
    # outputs: each request's one id is the log's length parity, so ours and the peer's never agree
    assert report["peer_greedy_agree_fraction"] == 0.0
    assert report["greedy_match"] is None  # fresh ids per repeat: no prompt ran both cold and warm
    assert "| warm / the peer's warm TTFT, each repeat | 0.40, 0.40, 0.40 |" in markdown(report)


def test_bench_against_a_peer_server(tmp_path, capsys):
    """Two real servers on loopback (the same random weights): prefix-pair and shared-prefix with
    ``--url`` ours and ``--peer-url`` the other; both see the same ids, hit alike, answer alike."""
    from test_server_harness import running, serve, tiny_engine

    with running(tiny_engine()) as a, serve(a) as ours, running(tiny_engine()) as b, serve(b) as peer:
        http = ["--url", ours.url, "--peer-url", peer.url, "--no-throughput", "--peer-quiet-s", "0.5"]
        r = _run(tmp_path, "--workload", "prefix-pair", "--prompt-tokens", "96", "--suffix-tokens", "32",
                 "--repeats", "2", "--output-tokens", "3", *http)
        assert r["backends"]["peer"]["url"] == peer.url + "/v1"
        assert r["cached_tokens"] == r["peer_cached_tokens"] == 64
        assert r["cold_cached_tokens"] == r["peer_cold_cached_tokens"] == 0  # fresh ids: cold is cold
        assert r["peer_greedy_agree_fraction"] == 1.0  # the same weights, the same kernels
        assert len(r["warm_over_peer_warm_per_repeat"]) == 2 and r["warm_over_peer_warm"] > 0
        assert [x["cached_tokens"] for x in r["requests"]["peer warm"]] == [64, 64]
        assert any(t["name"] == "warm TTFT / the peer's warm TTFT" for t in r["targets"])
        # both engines ran the same prompt tokens: the warm-up, then 2 x (cold, warm, suffix-only)
        assert a.call(lambda e: e.stats()["prompt_tokens"]) == b.call(lambda e: e.stats()["prompt_tokens"])
        r = _run(tmp_path, "--workload", "shared-prefix", "--groups", "2", "--questions", "2",
                 "--prefix-tokens", "64", "--question-tokens", "8", "--output-tokens", "2", *http)
        assert set(r["arms"]) == {"cache", "peer"}
        assert r["arms"]["cache"]["cached_tokens"] == r["arms"]["peer"]["cached_tokens"] == 2 * 64
        assert r["peer_greedy_agree_fraction"] == 1.0 and r["total_over_peer"] > 0 and r["ttft_p50_over_peer"] > 0
    assert "| TTFT p50 / the peer's |" in capsys.readouterr().out


def test_outputs_agree_by_ids_where_both_sides_give_them_else_by_text():
    def res(ids, text):
        return RequestResult("x", 3, 0, ids, text, len(ids), 0.1, 0.1)

    assert res([5, 6], "ab").same_output(res([5, 6], "zz"))  # ids decide where both have them
    assert not res([5, 6], "ab").same_output(res([5, 7], "ab"))
    assert res([5, 6], "ab").same_output(res([], "ab"))  # a server that returns no ids: text
    assert not res([], "ab").same_output(res([5, 6], "ac"))


def test_bench_refuses_what_a_peer_cannot_pair_with(capsys):
    for extra, says in ((["--peer-served-model", "m"], "need --peer-url"),
                        (["--peer-url", "http://127.0.0.1:9", "--baseline", "transformers"], "fresh ids"),
                        (["--peer-url", "http://127.0.0.1:9", "--workload", "tenant-probe"], "in-process only")):
        rc = main(["bench", "--model", "random:tiny", "--dtype", "float32", "--no-progress", "--no-throughput",
                   *extra])
        assert rc != 0 and says in capsys.readouterr().err


def test_quiet_host_stops_waiting_once_waits_keep_running_out(capsys):
    from promptcache.bench.machine import QuietHost

    quiet = QuietHost(0.0, give_up=3)  # a limit of 0 s: every wait runs out
    for _ in range(5):
        quiet()
    assert quiet.timeouts == 3  # then no more waits
    assert capsys.readouterr().err.count("no more waits for a quiet host") == 1


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc/stat (Linux)")
def test_wait_for_quiet_waits_out_a_busy_core_up_to_its_limit():
    """A process spinning on a core (as a server polling after its answer) keeps the host busy: the
    wait lasts while it spins, and never past its limit."""
    import subprocess
    import sys
    import time

    from promptcache.bench.machine import wait_for_quiet

    spin = "import time\nprint('go', flush=True)\nt = time.time()\nwhile time.time() - t < {}: pass\n"
    for seconds, limit in ((1.0, 5.0), (20.0, 0.5)):
        proc = subprocess.Popen([sys.executable, "-c", spin.format(seconds)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "go\n"
            started = time.monotonic()
            waited = wait_for_quiet(limit)
            assert waited >= min(seconds, limit) - 0.3  # not quiet while the core spins
            assert waited <= limit + 0.5
            if seconds < limit:  # quiet once it stops (unless the host is busy with other work)
                assert proc.wait(timeout=5) == 0 and time.monotonic() - started >= seconds - 0.3
        finally:
            proc.kill()
            proc.wait()


def test_bench_multi_turn_and_long_doc(tmp_path):
    r = _run(tmp_path, "--workload", "multi-turn", "--users", "2", "--rounds", "2", "--prefix-tokens", "32",
             "--question-tokens", "16", "--output-tokens", "4", "--no-throughput")
    assert r["greedy_match"] is True
    # round 0: user 1 reuses the 32-token system prompt; round 1: each reuses its 48-token round-0 prompt
    assert [x["cached_tokens"] for x in r["requests"]["cache"]] == [0, 32, 48, 48]
    assert [x["ideal_cached_tokens"] for x in r["requests"]["cache"]] == [0, 32, 51, 51]
    r = _run(tmp_path, "--workload", "long-doc", "--documents", "2", "--doc-tokens", "64", "--asks", "2",
             "--question-tokens", "8", "--output-tokens", "2", "--order", "interleave", "--no-throughput")
    assert [x["cached_tokens"] for x in r["requests"]["cache"]] == [0, 0, 64, 64]
    assert r["greedy_match"] is True


def _sse(chunks: list[dict]) -> bytes:
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


def test_http_backend_parses_stream_and_usage():
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        body = json.loads(request.content)
        seen.append(body)
        chunks = [{"choices": [{"text": "a", "token_ids": [5]}]}, {"choices": [{"text": "b", "token_ids": [6]}]},
                  {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                            "prompt_tokens_details": {"cached_tokens": 2}}}]
        return httpx.Response(200, content=_sse(chunks), headers={"content-type": "text/event-stream"})

    backend = HttpBackend("http://server", transport=httpx.MockTransport(handler))
    assert backend.model == "m" and backend.base == "http://server/v1"
    (res,) = backend.run_wave([BenchRequest("x", [11, 12, 13], 2)])
    assert (res.output_ids, res.output_text, res.cached_tokens, res.completion_tokens) == ([5, 6], "ab", 2, 2)
    assert seen[0]["prompt"] == [11, 12, 13] and seen[0]["stream_options"] == {"include_usage": True}
    assert res.ttft_s <= res.latency_s


def test_markdown_lists_targets():
    report = {"workload": "prefix-pair", "arms": {}, "warm_over_suffix_only": 1.1,
              "targets": [{"name": "warm TTFT / suffix-only TTFT", "value": 1.1, "limit": 1.25, "met": True}]}
    text = markdown(report)
    assert "warm / suffix-only TTFT (ideal 1.0) | 1.100" in text and "(met)" in text


def test_bench_agreement_figures_and_deterministic_arms(tmp_path, capsys):
    """Native bf16 math (forced, so any CPU runs it): agreement figures of the default arms, and the
    deterministic arms' cost and exactness, all in one run."""
    r = _run(tmp_path, "--workload", "multi-turn", "--users", "2", "--rounds", "2", "--prefix-tokens", "300",
             "--question-tokens", "16", "--output-tokens", "6", "--no-throughput", "--dtype", "bfloat16",
             "--compute-dtype", "bfloat16", "--deterministic-arms", greedy_may_differ=True)
    assert set(r["arms"]) == {"cache", "no-cache", "det-cache", "det-no-cache"}
    assert r["backends"]["det-cache"]["deterministic"] is True and r["engine"]["deterministic"] is False
    assert r["backends"]["det-cache"]["compute_dtype"] == "bfloat16"
    assert 0.0 <= r["greedy_agree_fraction"] <= 1.0 and r["max_logprob_diff"] >= 0.0
    assert r["greedy_agree_fraction"] == 1.0 - len(r["greedy_mismatches"]) / 4
    det = r["deterministic"]
    assert det["det_greedy_agree_fraction"] == 1.0 and det["det_max_logprob_diff"] == 0.0  # bit-exact
    assert det["slowdown_cache"] > 0 and det["det_tokens_per_s_cache"] > 0
    assert [x["cached_tokens"] for x in r["requests"]["det-cache"]] == [x["cached_tokens"] for x in
                                                                          r["requests"]["cache"]]
    out = capsys.readouterr().out
    assert "requests whose greedy outputs agree" in out and "deterministic mode: total time" in out


def test_report_states_the_machine(tmp_path, capsys):
    r = _run(tmp_path, "--workload", "long-doc", "--documents", "1", "--doc-tokens", "32", "--asks", "1",
             "--question-tokens", "8", "--output-tokens", "2", "--no-throughput")
    from promptcache.engine.precision import POLICY_FLAGS, cpu_has_native_bf16

    flags = r["host"]["cpu_flags"]
    assert set(flags) <= set(POLICY_FLAGS) and ("avx512_bf16" in flags or "amx_bf16" in flags) == cpu_has_native_bf16()
    assert r["engine"]["precision"] == "cpu, float32 math, float32 KV cache"
    assert f"flags {' '.join(flags)}" in capsys.readouterr().out


def test_bench_tier_workload_counts_each_arms_hit(tmp_path, capsys, redis_server):
    """Every arm but recompute reuses the whole prefix, each from where it claims (no timing asserts)."""
    r = _run(tmp_path, "--workload", "tier", "--prompt-tokens", "128", "--suffix-tokens", "16", "--repeats", "2",
             "--disk-cache", str(tmp_path / "disk"), "--redis-url", redis_server.url, "--no-tier-skip-slower")
    tier = r["tier"]
    assert tier["cached_tokens"] == {"recompute": 0, "memory": 128, "disk_page_cache": 128, "disk_cold": 128,
                                     "redis": 128}
    counters = tier["tier_counters"]
    assert counters["disk"]["hit_blocks"] == 2 * 2 * 8  # two disk arms, two repeats, 8 blocks
    assert counters["redis"]["hit_blocks"] == 2 * 8 and counters["redis"]["corrupt"] == 0
    assert tier["memory_copy_gb_s"] > 0 and tier["load_gb_s"]["disk"] > 0
    assert {t["name"] for t in r["targets"]} >= {"TTFT, prefix from disk (cold page cache) / recomputing"}
    assert "tier: TTFT, prefix from redis" in capsys.readouterr().out
