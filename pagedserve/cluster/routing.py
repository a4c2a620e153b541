"""Prefix-aware routing: send a request where its prompt's KV blocks are already cached.

Ray Serve's default router picks the less loaded of two random replicas, so
requests that share a long prompt prefix (a tenant's system prompt) land on
every replica and each one computes and caches the same blocks. This router
sends them to the replica that most likely holds them:

- each LLMServer replica reports the fingerprints of its cached blocks
  (`LLMServer.record_routing_stats`, every `request_routing_stats_period_s`):
  the first 8 bytes of each block's prefix-cache key, which chains the keys of
  all blocks before it, so matching one block matches the whole prefix;
- between reports the router remembers what it sent where, since a replica
  caches a prompt's blocks as soon as it computes them;
- a request's prompt is cut into the same blocks and hashed the same way
  (scheduler/block_manager.block_key), and the replica with the longest
  leading run of matching blocks wins;
- unless that replica holds `imbalance_threshold` more in-flight requests than
  the least loaded one: then the least loaded one takes it.

Requests without a match go to the less loaded of two random replicas, as
with Serve's default. Selected by `serving.request_router: prefix_aware`.
"""

from __future__ import annotations

import random
from collections import OrderedDict, defaultdict
from typing import Any

from ray.serve.request_router import (FIFOMixin, LocalityMixin, MultiplexMixin, PendingRequest,
                                      ReplicaID, RequestRouter, RunningReplica)

from pagedserve.scheduler.block_manager import block_key

FINGERPRINTS = "prefix_fingerprints"  # routing-stats keys, LLMServer.record_routing_stats
BLOCK_SIZE = "block_size"


def fingerprint(key: bytes) -> int:
    return int.from_bytes(key[:8], "little")


def prompt_fingerprints(token_ids: list[int], block_size: int, max_blocks: int) -> list[int]:
    """Fingerprints of the prompt's full blocks, as the block manager keys them."""
    prints, parent = [], None
    for start in range(0, min(len(token_ids) - 1, max_blocks * block_size) - block_size + 1,
                       block_size):
        parent = block_key(parent, token_ids[start:start + block_size], None)
        prints.append(fingerprint(parent))
    return prints


def _prompt(pending_request: PendingRequest | None) -> list[int] | None:
    """The prompt token ids of an LLMServer.generate(request_id, prompt_token_ids, params) call."""
    if pending_request is None or len(pending_request.args) < 2:
        return None
    tokens = pending_request.args[1]
    return tokens if isinstance(tokens, list) else None


class PrefixAwareRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, imbalance_threshold: int = 8, max_prompt_blocks: int = 256,
                         remembered_blocks: int = 65536, **kwargs: Any) -> None:
        self.imbalance_threshold = imbalance_threshold
        self.max_prompt_blocks = max_prompt_blocks
        self.remembered_blocks = remembered_blocks
        self._in_flight: dict[ReplicaID, int] = defaultdict(int)
        # Per replica, fingerprints of the prompts routed there (LRU, bounded).
        self._routed: dict[ReplicaID, OrderedDict[int, None]] = defaultdict(OrderedDict)
        # Per pending request (by id()), its prompt's fingerprints until it is routed.
        self._prints_of: OrderedDict[int, list[int]] = OrderedDict()
        self._cached: dict[ReplicaID, tuple[Any, frozenset[int]]] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None,
                              ) -> list[list[RunningReplica]]:
        if len(candidate_replicas) <= 1:
            return [candidate_replicas]
        by_load = sorted(candidate_replicas, key=lambda r: self._in_flight[r.replica_id])
        tokens = _prompt(pending_request)
        block_size = next((r.routing_stats.get(BLOCK_SIZE) for r in candidate_replicas
                           if r.routing_stats.get(BLOCK_SIZE)), None)
        if tokens is None or block_size is None:
            return [self._two_random(candidate_replicas)]
        prints = prompt_fingerprints(tokens, block_size, self.max_prompt_blocks)
        self._prints_of[id(pending_request)] = prints
        while len(self._prints_of) > 4096:  # requests cancelled before they were routed
            self._prints_of.popitem(last=False)
        matches = {r.replica_id: self._match(r, prints) for r in candidate_replicas}
        best = max(candidate_replicas,
                   key=lambda r: (matches[r.replica_id], -self._in_flight[r.replica_id]))
        least = self._in_flight[by_load[0].replica_id]
        if (matches[best.replica_id] == 0
                or self._in_flight[best.replica_id] - least >= self.imbalance_threshold):
            return [self._two_random(candidate_replicas)]
        # The best match first; if it refuses (full), the others by load.
        return [[best], [r for r in by_load if r is not best]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: Any) -> None:
        self._in_flight[replica_id] += 1
        prints = self._prints_of.pop(id(pending_request), None)
        if prints:
            routed = self._routed[replica_id]
            for value in prints:
                routed[value] = None
                routed.move_to_end(value)
            while len(routed) > self.remembered_blocks:
                routed.popitem(last=False)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self._in_flight[replica_id] > 0:
            self._in_flight[replica_id] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        self._in_flight.pop(replica_id, None)
        self._routed.pop(replica_id, None)
        self._cached.pop(replica_id, None)
        super().on_replica_actor_died(replica_id)

    # -- helpers -------------------------------------------------------------
    def _match(self, replica: RunningReplica, prints: list[int]) -> int:
        """How many of the prompt's leading blocks the replica holds (or was sent)."""
        cached = self._cached_set(replica)
        routed = self._routed.get(replica.replica_id, {})
        count = 0
        for value in prints:
            if value not in cached and value not in routed:
                break
            count += 1
        return count

    def _cached_set(self, replica: RunningReplica) -> frozenset[int]:
        """The replica's last reported fingerprints, as a set (rebuilt when a report lands)."""
        reported = replica.routing_stats.get(FINGERPRINTS) or ()
        memo = self._cached.get(replica.replica_id)
        if memo is None or memo[0] is not reported:
            memo = (reported, frozenset(reported))
            self._cached[replica.replica_id] = memo
        return memo[1]

    def _two_random(self, replicas: list[RunningReplica]) -> list[RunningReplica]:
        """Serve's default: two random replicas, of which it takes the shorter queue."""
        return random.sample(replicas, min(2, len(replicas)))
