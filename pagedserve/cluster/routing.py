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
  leading run of matching blocks wins; between equal matches, the replica the
  prefix was last sent to;
- unless that replica is much busier than the least loaded one: it holds
  `imbalance_threshold` more in-flight requests, and at least twice as many.
  Then the least loaded one takes it (and caches the prefix too), and the
  prefix's later requests follow it there.

A prompt no replica holds goes to the replica that was sent the fewest
distinct prefixes (the most room to cache it; ties: the less loaded), so
tenants spread evenly over the replicas' caches. Requests without token ids
or a full block go to the less loaded of two random replicas, as with
Serve's default. Selected by `serving.request_router: prefix_aware`.

A request under a LoRA adapter goes to a replica that reports the adapter in
its device slots (routing stats, `ADAPTERS`), when one does, so adapters are
not loaded everywhere; its prompt's blocks are keyed by the adapter's name,
as the replica's prefix cache keys them, so they match only that adapter's.
"""

from __future__ import annotations

import random
from collections import OrderedDict, defaultdict
from typing import Any

from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from pagedserve.scheduler.block_keys import block_key

FINGERPRINTS = "prefix_fingerprints"  # the routing-stats key, LLMServer.record_routing_stats
ADAPTERS = "lora_adapters"  # the names of the LoRA adapters in a replica's device slots


def fingerprint(key: bytes) -> int:
    return int.from_bytes(key[:8], "little")


def prompt_fingerprints(token_ids: list[int], block_size: int, max_blocks: int,
                        adapter: str | None = None) -> list[int]:
    """Fingerprints of the prompt's full blocks, as the block manager keys them."""
    prints, parent = [], None
    for start in range(0, min(len(token_ids) - 1, max_blocks * block_size) - block_size + 1,
                       block_size):
        parent = block_key(parent, token_ids[start:start + block_size], adapter)
        prints.append(fingerprint(parent))
    return prints


def _put(entries: OrderedDict, key: int, value: Any, limit: int) -> None:
    """Insert or refresh `key` as the newest entry; drop the oldest beyond `limit`."""
    entries[key] = value
    entries.move_to_end(key)
    while len(entries) > limit:
        entries.popitem(last=False)


def _prompt(pending_request: PendingRequest | None) -> list[int] | None:
    """The prompt token ids of an LLMServer.generate(request_id, prompt_token_ids, params) call."""
    if pending_request is None or len(pending_request.args) < 2:
        return None
    tokens = pending_request.args[1]
    return tokens if isinstance(tokens, list) else None


def _adapter(pending_request: PendingRequest | None) -> str | None:
    """The LoRA adapter's name of a generate(..., inbox, lora) call, if it has one."""
    if pending_request is None:
        return None
    lora = (pending_request.args[4] if len(pending_request.args) > 4
            else (getattr(pending_request, "kwargs", None) or {}).get("lora"))
    return getattr(lora, "lora_name", None)


class PrefixAwareRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """No FIFOMixin: with it, a replica chosen for one request's prompt could be
    handed to whichever request is oldest, which defeats the prefix match."""

    def initialize_state(self, block_size: int = 16, imbalance_threshold: int = 8,
                         max_prompt_blocks: int = 256, remembered_blocks: int = 65536,
                         **kwargs: Any) -> None:
        # From the config, not from the replicas' reports: a burst that comes before
        # the first report is routed by prefix too (the memory of what went where).
        self.block_size = block_size
        self.imbalance_threshold = imbalance_threshold
        self.max_prompt_blocks = max_prompt_blocks
        self.remembered_blocks = remembered_blocks
        self._in_flight: dict[ReplicaID, int] = defaultdict(int)
        # Per replica, fingerprints of the prompts routed there -> when (a request
        # count), oldest first, bounded.
        self._routed: dict[ReplicaID, OrderedDict[int, int]] = defaultdict(OrderedDict)
        self._routed_count = 0
        # Per replica, the distinct first blocks sent there: how many prefixes it caches.
        self._heads: dict[ReplicaID, OrderedDict[int, None]] = defaultdict(OrderedDict)
        self._cached: dict[ReplicaID, tuple[Any, frozenset[int]]] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None,
                              ) -> list[list[RunningReplica]]:
        if len(candidate_replicas) <= 1:
            return [candidate_replicas]
        adapter = _adapter(pending_request)
        if adapter is not None:
            holders = [r for r in candidate_replicas
                       if adapter in (r.routing_stats.get(ADAPTERS) or ())]
            if holders and len(holders) < len(candidate_replicas):
                others = [r for r in candidate_replicas if r not in holders]
                ranked = await self.choose_replicas(holders, pending_request)
                return [*ranked, others]  # the others only if every holder refuses
        tokens = _prompt(pending_request)
        prints = (prompt_fingerprints(tokens, self.block_size, self.max_prompt_blocks, adapter)
                  if tokens is not None else [])
        if not prints:  # no token ids, or not one full block: Serve's default
            return [random.sample(candidate_replicas, 2)]
        load = {r.replica_id: self._in_flight[r.replica_id] for r in candidate_replicas}
        matches = {r.replica_id: self._match(r, prints) for r in candidate_replicas}
        if max(count for count, _ in matches.values()) == 0:
            # A new prefix: to the replica that was sent the fewest distinct prefixes
            # (the most room to cache it), as SGLang's cache-aware router does.
            best = min(candidate_replicas, key=lambda r: (len(self._heads[r.replica_id]),
                                                          load[r.replica_id]))
        else:
            # Equal matches: the replica this prefix was sent to last. A prefix moved by
            # a fallback stays moved, instead of alternating between two replicas that
            # must then both keep it cached.
            best = max(candidate_replicas,
                       key=lambda r: (*matches[r.replica_id], -load[r.replica_id]))
        least = min(load.values())
        # Much busier: `imbalance_threshold` more in flight, and at least twice as many.
        if (load[best.replica_id] - least >= self.imbalance_threshold
                and load[best.replica_id] >= 2 * least):
            # The less loaded of two random replicas, as Serve's default would take.
            best = min(random.sample(candidate_replicas, 2), key=lambda r: load[r.replica_id])
        self._remember(best.replica_id, prints)
        others = sorted((r for r in candidate_replicas if r is not best),
                        key=lambda r: load[r.replica_id])
        return [[best], others]  # the others only if `best` refuses (full)

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)
        self._in_flight[replica_id] += 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self._in_flight[replica_id] > 0:
            self._in_flight[replica_id] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        self._in_flight.pop(replica_id, None)
        self._routed.pop(replica_id, None)
        self._heads.pop(replica_id, None)
        self._cached.pop(replica_id, None)
        super().on_replica_actor_died(replica_id)

    # -- helpers -------------------------------------------------------------
    def _remember(self, replica_id: ReplicaID, prints: list[int]) -> None:
        """The replica computes (and caches) the prompt's blocks: match them from now on."""
        self._routed_count += 1
        for value in prints:
            _put(self._routed[replica_id], value, self._routed_count, self.remembered_blocks)
        _put(self._heads[replica_id], prints[0], None, self.remembered_blocks)

    def _match(self, replica: RunningReplica, prints: list[int]) -> tuple[int, int]:
        """How many of the prompt's leading blocks the replica holds (or was sent),
        and when the last of them was last sent there (0: only reported cached)."""
        cached = self._cached_set(replica)
        routed = self._routed.get(replica.replica_id, {})
        count = 0
        for value in prints:
            if value not in cached and value not in routed:
                break
            count += 1
        return count, routed.get(prints[count - 1], 0) if count else 0

    def _cached_set(self, replica: RunningReplica) -> frozenset[int]:
        """The replica's last reported fingerprints, as a set (rebuilt when a report lands)."""
        reported = replica.routing_stats.get(FINGERPRINTS) or ()
        memo = self._cached.get(replica.replica_id)
        if memo is None or memo[0] is not reported:
            memo = (reported, frozenset(reported))
            self._cached[replica.replica_id] = memo
        return memo[1]
