"""Autoscaling LLMServer replicas on KV-cache pressure, with Ray Serve's own machinery.

Each replica reports its block utilization, queue lengths and block demand
(`LLMServer.record_autoscaling_stats`); Serve averages them per replica over
`look_back_period_s` and, every control-loop tick, calls the deployment's
policy with an `AutoscalingContext`. A policy here is a class Serve builds once
from `policy_kwargs` (the config's `autoscaling.policy` section) and calls as
`policy(ctx) -> (replicas, policy_state)`:

- `KVUtilizationPolicy` steps one replica at a time: up while the pool is
  fuller than `target_utilization` and requests wait, down once it is emptier
  than `target_utilization * scale_down_ratio`;
- `KVCapacityPolicy` sizes the deployment to the blocks that running and
  waiting requests demand, so a burst is met in one step.

Both hold a change back until it has been wanted for its delay
(`upscale_delay_s` / `downscale_delay_s`, kept in `policy_state`), and stay
within the context's replica bounds. Serve's own delays are set to zero
(cluster/app.py), so these are the only ones.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from typing import Any

# The stats each replica reports, by name (LLMServer.record_autoscaling_stats).
KV_UTILIZATION = "kv_utilization"  # allocated blocks / all blocks, 0..1
NUM_WAITING = "num_waiting"  # requests not running (EngineStats.num_not_running)
NUM_RUNNING = "num_running"
BLOCKS_DEMANDED = "blocks_demanded"  # allocated + what waiting prompts will take
TOTAL_BLOCKS = "total_blocks"

_WANT, _SINCE = "pagedserve_wanted_replicas", "pagedserve_wanted_since"


def _per_replica(ctx, name: str) -> dict[Any, float]:
    return dict((ctx.aggregated_metrics or {}).get(name) or {})


class _DelayedPolicy(ABC):
    """Bounds and delays around `desired`, which each policy defines."""

    def __init__(self, upscale_delay_s: float = 30.0, downscale_delay_s: float = 300.0) -> None:
        self.upscale_delay_s, self.downscale_delay_s = upscale_delay_s, downscale_delay_s

    @abstractmethod
    def desired(self, ctx, current: int) -> int:
        """The replica count this policy wants now, before bounds and delays."""

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        current = ctx.target_num_replicas
        state = dict(ctx.policy_state or {})
        low, high = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        want = min(max(self.desired(ctx, current), low), high)
        if want == current:
            state.pop(_WANT, None), state.pop(_SINCE, None)
            return current, state
        now = ctx.current_time if ctx.current_time is not None else time.time()
        previous = state.get(_WANT)
        same_direction = previous is not None and (previous > current) == (want > current)
        if not same_direction:
            state[_SINCE] = now
        state[_WANT] = want
        delay = self.upscale_delay_s if want > current else self.downscale_delay_s
        if now - state[_SINCE] >= delay:
            state.pop(_WANT), state.pop(_SINCE)
            return want, state
        return current, state


class KVUtilizationPolicy(_DelayedPolicy):
    """One replica up when blocks are scarce and requests wait; one down when blocks idle."""

    def __init__(self, target_utilization: float = 0.8, queue_threshold: int = 0,
                 scale_down_ratio: float = 0.5, **delays: float) -> None:
        super().__init__(**delays)
        self.target_utilization = target_utilization
        self.queue_threshold = queue_threshold
        self.scale_down_ratio = scale_down_ratio

    def desired(self, ctx, current: int) -> int:
        utilization = _per_replica(ctx, KV_UTILIZATION)
        if not utilization:  # no replica has reported yet
            return current
        mean = sum(utilization.values()) / len(utilization)
        waiting = sum(_per_replica(ctx, NUM_WAITING).values())
        if mean > self.target_utilization and waiting > self.queue_threshold:
            return current + 1
        if mean < self.target_utilization * self.scale_down_ratio and \
                waiting <= self.queue_threshold:
            return current - 1
        return current


class KVCapacityPolicy(_DelayedPolicy):
    """ceil(blocks demanded / (blocks per replica * target_utilization)) replicas."""

    def __init__(self, target_utilization: float = 0.8, **delays: float) -> None:
        super().__init__(**delays)
        self.target_utilization = target_utilization

    def desired(self, ctx, current: int) -> int:
        capacity = _per_replica(ctx, TOTAL_BLOCKS)
        if not capacity:
            return current
        demanded = sum(_per_replica(ctx, BLOCKS_DEMANDED).values())
        per_replica = max(capacity.values()) * self.target_utilization
        return math.ceil(demanded / per_replica)


POLICIES = {"kv_utilization": KVUtilizationPolicy, "kv_capacity": KVCapacityPolicy}
