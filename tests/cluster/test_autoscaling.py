"""The autoscaling policies as pure functions of a synthetic Serve AutoscalingContext."""

from __future__ import annotations

import dataclasses

import pytest
from ray.serve.config import AutoscalingContext

from pagedserve.cluster.autoscaling import (
    BLOCKS_DEMANDED,
    KV_UTILIZATION,
    NUM_WAITING,
    TOTAL_BLOCKS,
    KVCapacityPolicy,
    KVUtilizationPolicy,
)
from pagedserve.engine.stats import EngineStats


def context(replicas: int, stats: list[dict[str, float]], *, now: float = 100.0,
            state: dict | None = None, bounds: tuple[int, int] = (1, 4)) -> AutoscalingContext:
    """`replicas` running, each reporting one dict of stats (averaged already, as Serve does)."""
    ids = [f"replica-{i}" for i in range(len(stats))]
    metrics: dict[str, dict[str, float]] = {}
    for replica, reported in zip(ids, stats, strict=True):
        for name, value in reported.items():
            metrics.setdefault(name, {})[replica] = value
    return AutoscalingContext(
        deployment_id=None, deployment_name="LLMServer", app_name="app",
        current_num_replicas=replicas, target_num_replicas=replicas, running_replicas=ids,
        total_num_requests=0.0, total_queued_requests=0.0, aggregated_metrics=metrics,
        raw_metrics=None, capacity_adjusted_min_replicas=bounds[0],
        capacity_adjusted_max_replicas=bounds[1], policy_state=state or {},
        last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=None)


def kv(utilization: float, waiting: float = 0) -> dict[str, float]:
    return {KV_UTILIZATION: utilization, NUM_WAITING: waiting}


NO_DELAY = dict(upscale_delay_s=0.0, downscale_delay_s=0.0)


@pytest.mark.parametrize("replicas, stats, expected", [
    (1, [kv(0.95, waiting=3)], 2),                  # full and queueing: up
    (2, [kv(0.9, 5), kv(0.85, 0)], 3),              # mean 0.875 > 0.8, waiting: up
    (1, [kv(0.95, waiting=0)], 1),                  # full but nobody waits: hold
    (1, [kv(0.5, waiting=9)], 1),                   # waiting, blocks free: hold (not memory)
    (2, [kv(0.1), kv(0.2)], 1),                     # mean 0.15 < 0.8 * 0.5: down
    (2, [kv(0.1, 2), kv(0.2)], 2),                  # low but requests wait: hold
    (2, [kv(0.5), kv(0.5)], 2),                     # between the thresholds: hold
    (4, [kv(0.99, 9)] * 4, 4),                      # at max_replicas: hold
    (1, [kv(0.0)], 1),                              # at min_replicas: hold
    (1, [], 1),                                     # nothing reported yet: hold
])
def test_kv_utilization_steps_one_replica(replicas, stats, expected):
    policy = KVUtilizationPolicy(target_utilization=0.8, queue_threshold=0, **NO_DELAY)
    assert policy(context(replicas, stats))[0] == expected


def test_kv_utilization_queue_threshold_and_ratio():
    policy = KVUtilizationPolicy(target_utilization=0.7, queue_threshold=4,
                                 scale_down_ratio=0.25, **NO_DELAY)
    assert policy(context(1, [kv(0.9, waiting=4)]))[0] == 1   # not above the threshold
    assert policy(context(1, [kv(0.9, waiting=5)]))[0] == 2
    assert policy(context(2, [kv(0.2), kv(0.2)]))[0] == 2      # 0.2 >= 0.7 * 0.25
    assert policy(context(2, [kv(0.1), kv(0.2)]))[0] == 1


def cap(demanded: float, total: float = 100) -> dict[str, float]:
    return {BLOCKS_DEMANDED: demanded, TOTAL_BLOCKS: total}


@pytest.mark.parametrize("replicas, stats, bounds, expected", [
    (1, [cap(310)], (1, 8), 4),            # ceil(310 / 80): a burst in one step
    (1, [cap(80)], (1, 8), 1),             # exactly at the target
    (1, [cap(81)], (1, 8), 2),
    (3, [cap(10), cap(0), cap(5)], (1, 8), 1),   # demand gone: down to what is needed
    (2, [cap(0), cap(0)], (0, 8), 0),      # idle, min 0: to zero
    (1, [cap(10_000)], (1, 3), 3),         # capped at max_replicas
    (2, [], (1, 8), 2),                    # nothing reported: hold
])
def test_kv_capacity_sizes_to_demand(replicas, stats, bounds, expected):
    policy = KVCapacityPolicy(target_utilization=0.8, **NO_DELAY)
    assert policy(context(replicas, stats, bounds=bounds))[0] == expected


def test_upscale_waits_for_its_delay_and_resets_on_a_change_of_mind():
    policy = KVUtilizationPolicy(upscale_delay_s=10.0, downscale_delay_s=60.0)
    full, idle, mid = [kv(0.95, 3)], [kv(0.0)], [kv(0.5)]
    replicas, state = policy(context(1, full, now=0.0))
    assert replicas == 1                                       # wanted since t=0
    replicas, state = policy(context(1, full, now=9.0, state=state))
    assert replicas == 1
    replicas, state = policy(context(1, full, now=10.0, state=state))
    assert replicas == 2 and state == {}                       # 10 s later: up
    # Down is wanted, then not (hold), then wanted again: the delay starts over.
    replicas, state = policy(context(2, idle * 2, now=20.0, state=state))
    replicas, state = policy(context(2, mid * 2, now=50.0, state=state))
    assert replicas == 2 and state == {}
    replicas, state = policy(context(2, idle * 2, now=60.0, state=state))
    replicas, state = policy(context(2, idle * 2, now=110.0, state=state))
    assert replicas == 2                                       # 50 s of 60
    replicas, state = policy(context(2, idle * 2, now=120.0, state=state))
    assert replicas == 1


def test_a_reversal_restarts_the_delay():
    policy = KVCapacityPolicy(upscale_delay_s=5.0, downscale_delay_s=5.0)
    _, state = policy(context(2, [cap(400), cap(0)], now=0.0))     # wants up
    _, state = policy(context(2, [cap(0), cap(0)], now=4.0, state=state))  # now wants down
    replicas, state = policy(context(2, [cap(0), cap(0)], now=8.0, state=state))
    assert replicas == 2                                       # down wanted only since t=4
    replicas, _ = policy(context(2, [cap(0), cap(0)], now=9.0, state=state))
    assert replicas == 1


def test_policy_state_keeps_other_keys():
    policy = KVUtilizationPolicy(**NO_DELAY)
    replicas, state = policy(context(1, [kv(0.99, 1)], state={"serve_internal": 7}))
    assert replicas == 2 and state["serve_internal"] == 7


def queues(running: int, waiting: int, swapped: int) -> EngineStats:
    fields = dict.fromkeys((f.name for f in dataclasses.fields(EngineStats)), 0)
    return EngineStats(**{**fields, "num_running": running, "num_waiting": waiting,
                          "num_swapped": swapped})


def test_the_waiting_counts_differ_only_as_named():
    """The gauge reads num_waiting; the autoscaler counts every request not running;
    the replica's bound counts the not-yet-admitted ones the free slots cannot take."""
    stats = queues(running=6, waiting=3, swapped=2)
    assert stats.num_not_running(num_pending=1) == 3 + 2 + 1
    assert stats.num_waiting_for_a_slot(num_pending=1, max_num_seqs=8) == 3 + 1 - 2
    assert stats.num_waiting_for_a_slot(num_pending=0, max_num_seqs=10) == 0  # never negative
    assert queues(running=9, waiting=1, swapped=0).num_waiting_for_a_slot(0, 8) == 1
