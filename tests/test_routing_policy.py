"""The cache-aware routing policy without Ray: exact choices for given replica states."""

from __future__ import annotations

import random

from promptcache.cache.hashing import hash_blocks, namespace_hash
from promptcache.cluster.policy import Costs, HotPrefixes, Replica, ReplicaIndex, rank

BS = 16


def chain(tenant: str, tokens: list[int]) -> list:
    return hash_blocks(namespace_hash("m", tenant), tokens, BS)


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 4000) for _ in range(n)]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_tenants_prefix_goes_to_the_replica_that_holds_it() -> None:
    index = ReplicaIndex()
    c = chain("acme", tokens(512, 1))
    index.added("b", c[:24])
    replicas = [Replica("a", 0), Replica("b", 0), Replica("c", 0)]
    best = rank(c, None, replicas, index, BS)[0]
    assert (best.name, best.matched_blocks, best.reason) == ("b", 24, "affinity")
    # another tenant's identical text holds nothing anywhere: plain least cost
    other = rank(chain("globex", tokens(512, 1)), None, replicas, index, BS)[0]
    assert other.matched_blocks == 0 and other.reason == "least_cost"


def test_distinct_prefixes_spread_with_load() -> None:
    index = ReplicaIndex()
    load = {"a": 0, "b": 0}
    for i in range(40):
        c = chain("t", tokens(256, 100 + i))
        best = rank(c, None, [Replica(n, load[n]) for n in load], index, BS)[0]
        load[best.name] += 256
        index.added(best.name, c)
    assert abs(load["a"] - load["b"]) <= 256  # alternates: nothing to reuse, load decides


def test_distinct_prefixes_spread_when_loads_are_equal() -> None:
    # requests one after another: every replica is idle at each decision, so no load tells them
    # apart; the prefix does (rendezvous hashing), and the same prefix keeps its replica
    index = ReplicaIndex()
    picks = [rank(chain("t", tokens(64, 500 + i)), None, [Replica("a", 0), Replica("b", 0)], index, BS)[0].name
             for i in range(40)]
    assert 10 <= picks.count("a") <= 30
    again = [rank(chain("t", tokens(64, 500 + i)), None, [Replica("a", 0), Replica("b", 0)], index, BS)[0].name
             for i in range(40)]
    assert again == picks


def test_a_replica_past_the_load_bound_is_passed_over() -> None:
    index = ReplicaIndex()
    c = chain("t", tokens(8192, 2))
    index.added("a", c)  # a holds the whole prefix ...
    # ... and is still the cheapest by cost (18k queued tokens cost less than computing 512 blocks),
    # but it is above 1.25x the mean load
    replicas = [Replica("a", 18_000), Replica("b", 10_000), Replica("c", 10_000)]
    assert rank(c, None, replicas, index, BS, costs=Costs(max_load_ratio=100))[0].name == "a"
    best = rank(c, None, replicas, index, BS)[0]
    assert best.name != "a" and best.reason == "load_bound"
    # within the bound, affinity wins over a little load
    assert rank(c, None, [Replica("a", 12_000), Replica("b", 10_000)], index, BS)[0].name == "a"


def test_small_imbalances_never_break_affinity() -> None:
    # 1.8x the mean, but only a few hundred tokens: a lightly loaded fleet keeps its affinity (an
    # immediate resend must hit where its prefix is)
    index = ReplicaIndex()
    c = chain("t", tokens(512, 3))
    index.added("a", c)
    assert rank(c, None, [Replica("a", 900), Replica("b", 100)], index, BS)[0].name == "a"
    assert rank(c, None, [Replica("a", 900), Replica("b", 100)], index, BS,
                costs=Costs(load_slack_tokens=0))[0].reason == "load_bound"


def test_a_system_prompt_every_tenant_shares_does_not_concentrate_tenants() -> None:
    index = ReplicaIndex()
    system = tokens(256, 3)
    index.added("a", chain("t0", system))  # tenant t0's requests warmed replica a
    replicas = [Replica("a", 0), Replica("b", 0)]
    others = [rank(chain(f"t{i}", system + tokens(64, i)), None, replicas, index, BS)[0] for i in range(1, 9)]
    assert all(o.matched_blocks == 0 for o in others)  # the namespace differs from block 0


def test_a_dead_replica_is_never_chosen_and_its_entries_vanish() -> None:
    index = ReplicaIndex()
    c = chain("t", tokens(256, 4))
    index.added("a", c)
    assert rank(c, None, [Replica("a", 0, alive=False), Replica("b", 0)], index, BS)[0].name == "b"
    index.drop("a")  # it restarted: nothing it held is credited
    assert index.matched("a", c) == 0 and index.size("a") == 0
    assert rank(c, None, [Replica("a", 0, alive=False)], index, BS) == []


def test_entries_expire_and_evictions_count() -> None:
    clock = Clock()
    index = ReplicaIndex(ttl_s=10, clock=clock)
    c = chain("t", tokens(256, 5))
    index.added("a", c)
    index.evicted("a", c[8:])
    assert index.matched("a", c) == 8
    clock.t = 11
    assert index.matched("a", c) == 0


def test_the_shared_tier_makes_any_replica_cheap() -> None:
    index = ReplicaIndex()
    c = chain("t", tokens(512, 6))
    held_in_redis = set(c)
    choices = rank(c, None, [Replica("a", 0), Replica("b", 0)], index, BS,
                   shared=lambda rest: next((i for i, h in enumerate(rest) if h not in held_in_redis), len(rest)))
    assert all(ch.cost == len(c) * Costs().fetch_per_block for ch in choices)  # fetch, do not compute


def test_a_hot_prefix_spreads_to_a_second_replica() -> None:
    clock = Clock()
    hot = HotPrefixes(clock=clock)
    index = ReplicaIndex(clock=clock)
    c = chain("t", tokens(512, 7))
    index.added("a", c)
    seen = []
    for i in range(30):
        clock.t = i
        replicas = [Replica("a", 1_500), Replica("b", 1_000)]  # within the load bound
        seen.append(rank(c, "k", replicas, index, BS, hot=hot)[0])
    assert all(s.name == "a" for s in seen[:15])  # affinity while it is not hot
    assert all(s.name == "b" and s.reason == "hot_spread" for s in seen[15:])  # then it spreads
    clock.t = 200  # a quiet minute later: back to affinity
    assert rank(c, "k", [Replica("a", 1_500), Replica("b", 1_000)], index, BS, hot=hot)[0].name == "a"


def test_the_index_and_the_hot_prefix_counts_stay_bounded() -> None:
    clock = Clock()
    index = ReplicaIndex(ttl_s=30, clock=clock, max_per_replica=1000)
    hot = HotPrefixes(clock=clock)
    for i in range(2000):
        clock.t = i  # one distinct prompt a second
        c = chain("t", tokens(32, 10_000 + i))
        index.added("a", c)
        hot.hit(c[-1], None)
    assert index.size("a") <= 60  # two blocks a second, 30 s of them
    assert len(hot._seen) <= 61
    burst = ReplicaIndex(ttl_s=3600, max_per_replica=100)
    burst.added("a", chain("t", tokens(16 * 500, 3)))
    assert burst.size("a") == 100
