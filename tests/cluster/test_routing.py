"""The prefix-aware router's choices, on stand-in replicas (no Serve needed)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from pagedserve.cluster.routing import (
    FINGERPRINTS,
    PrefixAwareRouter,
    fingerprint,
    prompt_fingerprints,
)
from pagedserve.scheduler.block_manager import BlockManager

BS = 16


@dataclass
class Replica:
    replica_id: str
    routing_stats: dict = field(default_factory=dict)


@dataclass
class Request:
    """What the router reads of Serve's PendingRequest: generate()'s arguments."""

    args: list


def router(**kwargs) -> PrefixAwareRouter:
    router = PrefixAwareRouter.__new__(PrefixAwareRouter)  # only its routing state
    router.initialize_state(**{"block_size": BS, **kwargs})
    return router


def route(router: PrefixAwareRouter, replicas: list[Replica], prompt: list[int]) -> Replica:
    """What Serve does with the ranks: the first rank's shortest queue takes it."""
    request = Request(args=["id", prompt, None])
    ranks = asyncio.run(router.choose_replicas(replicas, request))
    chosen = min(ranks[0], key=lambda r: router._in_flight[r.replica_id])
    router._in_flight[chosen.replica_id] += 1  # what on_send_request counts
    return chosen


def tenant_prompt(system: int, user: int) -> list[int]:
    """A tenant's 96-token system prompt, then a request's own 20 tokens."""
    rng = random.Random(system)
    prefix = [rng.randrange(6, 500) for _ in range(96)]
    rng = random.Random(10_000 + user)
    return prefix + [rng.randrange(6, 500) for _ in range(20)]


def test_fingerprints_match_the_block_managers_keys():
    prompt = tenant_prompt(0, 0)
    manager = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    manager.allocate(0, len(prompt), prompt)
    cached = {fingerprint(key) for key in manager.cached_block_keys()}
    prints = prompt_fingerprints(prompt, BS, max_blocks=64)
    assert len(prints) == (len(prompt) - 1) // BS and set(prints) <= cached


def test_repeats_of_a_shared_prefix_go_to_one_replica():
    replicas = [Replica("a"), Replica("b")]
    r = router()
    first = route(r, replicas, tenant_prompt(1, 0))
    for user in range(1, 8):
        assert route(r, replicas, tenant_prompt(1, user)) is first


def test_reported_cache_wins_over_an_empty_replica():
    prompt = tenant_prompt(2, 0)
    holder = Replica("b", {FINGERPRINTS: prompt_fingerprints(prompt, BS, 64)})
    replicas = [Replica("a"), holder]
    for user in range(5):
        assert route(router(), replicas, tenant_prompt(2, user)) is holder


def test_distinct_prompts_still_spread():
    replicas = [Replica("a"), Replica("b"), Replica("c")]
    r = router()
    counts = {"a": 0, "b": 0, "c": 0}
    for tenant in range(30):
        counts[route(r, replicas, tenant_prompt(100 + tenant, 0)).replica_id] += 1
    assert min(counts.values()) >= 5, counts


def test_a_much_busier_best_match_loses_to_the_least_loaded():
    replicas = [Replica("a"), Replica("b")]
    r = router(imbalance_threshold=4)
    home = route(r, replicas, tenant_prompt(3, 0))
    r._in_flight[home.replica_id] += 3  # 4 in flight there, none elsewhere
    other = next(x for x in replicas if x is not home)
    assert route(r, replicas, tenant_prompt(3, 1)) is other
    for _ in range(4):  # they finish; the prefix moved, and its requests follow it
        r.on_request_completed(home.replica_id, "x")
    assert route(r, replicas, tenant_prompt(3, 2)) is other
    assert route(r, replicas, tenant_prompt(3, 3)) is other
    # Another tenant still finds the idle replica.
    assert route(r, replicas, tenant_prompt(4, 0)) is home


def test_requests_without_token_ids_fall_back_to_two_random():
    replicas = [Replica("a"), Replica("b"), Replica("c")]
    ranks = asyncio.run(router().choose_replicas(replicas, Request(args=[])))
    assert len(ranks) == 1 and len(ranks[0]) == 2


def test_new_prefixes_spread_evenly_over_the_replicas_caches():
    replicas = [Replica("a"), Replica("b"), Replica("c")]
    r = router()
    r._in_flight["a"] += 3  # busier, yet not much busier: the prefix count decides
    homes = [route(r, replicas, tenant_prompt(t, 0)) for t in range(9)]
    assert sorted(h.replica_id for h in homes) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    for t in range(9):  # and each tenant's later requests find its home
        assert route(r, replicas, tenant_prompt(t, 1)) is homes[t]


def test_an_adapters_requests_go_where_it_is_resident_and_match_its_own_blocks():
    from pagedserve import LoRARequest
    from pagedserve.cluster.routing import ADAPTERS

    sql = LoRARequest("sql", 1, "/adapters/sql")
    replicas = [Replica("a", {ADAPTERS: []}), Replica("b", {ADAPTERS: ["sql"]}),
                Replica("c", {ADAPTERS: ["chat"]})]
    picker = router()

    def send(prompt, lora):
        ranks = asyncio.run(picker.choose_replicas(replicas, Request(["id", prompt, None, None,
                                                                      lora])))
        chosen = min(ranks[0], key=lambda r: picker._in_flight[r.replica_id])
        picker._in_flight[chosen.replica_id] += 1
        return chosen.replica_id, ranks

    for user in range(6):  # wherever each prompt's blocks are, the adapter decides
        chosen, ranks = send(tenant_prompt(user, user), sql)
        assert chosen == "b"
        assert {r.replica_id for r in ranks[-1]} == {"a", "c"}  # only if b refuses
    # A prompt routed under the adapter is keyed by it: the base's same prompt does not
    # match it, so it goes to the replica with the fewest prefixes, not to b.
    prompt = tenant_prompt(42, 0)
    assert send(prompt, sql)[0] == "b"
    assert prompt_fingerprints(prompt, BS, 256, "sql") != prompt_fingerprints(prompt, BS, 256)
    assert send(prompt, None)[0] != "b"
    # No replica holds it: routed as any other request.
    assert send(tenant_prompt(7, 1), LoRARequest("new", 2, "/adapters/new"))[0] in "abc"
