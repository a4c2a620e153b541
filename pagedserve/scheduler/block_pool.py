"""The GPU pool's blocks, whoever holds them: reference counts, filled slots, the free
queue and the prefix-cache index. BlockManager (block_manager.py) keeps the
sequences' side (their tables) and asks this pool for blocks.

A block's reference count is the number of tables holding it. A full block may
carry a prefix-cache key (block_keys.py): a SHA-256 of its parent block's key,
its token ids and an extra key such as an adapter name, so equal keys mean equal
prefixes; `cached` maps each key to its one block.

The free queue holds every block with no holder: blocks holding nothing
reusable at the front, cached blocks behind them in least-recently-freed
order. A fresh block is taken from the front (`take`), so a cached block is
evicted (its key forgotten) only when no plain free block is left, and a cache
hit on a free cached block takes it out of the queue (`hold`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pagedserve.scheduler.block_keys import BlockKey, block_key


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.keys: list[BlockKey | None] = [None] * num_blocks  # key of a cached block
        self.cached: dict[BlockKey, int] = {}
        self.num_free_cached = 0  # free blocks that have a key
        # Filled slots of each block, and their sum over the held ones (shared: once).
        self.fill = [0] * num_blocks
        self.stored = 0

    def longest_prefix(self, token_ids: Sequence[int], extra_key: str | None) -> list[int]:
        """The cached blocks of the longest chain of full blocks of `token_ids`."""
        if not self.enable_prefix_caching:
            return []
        blocks: list[int] = []
        parent = None
        bs = self.block_size
        for start in range(0, len(token_ids) - bs + 1, bs):
            parent = block_key(parent, token_ids[start:start + bs], extra_key)
            block_id = self.cached.get(parent)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks

    def keys_of(self, blocks: Sequence[int], token_ids: Sequence[int] | None,
                extra_key: str | None) -> list[BlockKey]:
        """The keys of blocks `longest_prefix` found for these tokens; such a list goes
        stale once a fresh block evicts one of its blocks, which is an error."""
        keys: list[BlockKey] = []
        parent = None
        bs = self.block_size
        for index, block_id in enumerate(blocks):
            key = self.keys[block_id]
            if token_ids is not None:
                parent = block_key(parent, token_ids[index * bs:(index + 1) * bs], extra_key)
            if key is None or (token_ids is not None and key != parent):
                raise ValueError(f"computed block {block_id} (logical block {index}) was evicted "
                                 "since computed_blocks: ask computed_blocks again")
            keys.append(key)
        return keys

    def register(self, block_id: int, key: BlockKey) -> None:
        """Make a full block the cache's entry for `key`, unless the key has one already."""
        if self.enable_prefix_caching and key not in self.cached and self.keys[block_id] is None:
            self.cached[key] = block_id
            self.keys[block_id] = key

    def hold(self, block_id: int) -> None:
        """One more table holds this block (a cache hit, perhaps on a free block)."""
        if self.ref_counts[block_id] == 0:
            del self.free[block_id]  # a cache hit on a free block: no longer evictable
            self.num_free_cached -= self.keys[block_id] is not None
            self.stored += self.fill[block_id]
        self.ref_counts[block_id] += 1

    def release(self, block_id: int) -> None:
        """One table less holds this block; with none left it joins the free queue."""
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            self.stored -= self.fill[block_id]  # a cached block keeps its fill for a hit
            self.free[block_id] = None  # at the back: evicted last
            if self.keys[block_id] is None:
                self.free.move_to_end(block_id, last=False)  # nothing to keep: reuse first
            else:
                self.num_free_cached += 1

    def take(self) -> int:
        """A fresh block, held once and empty: the queue's front, evicted if cached."""
        block_id, _ = self.free.popitem(last=False)
        key = self.keys[block_id]
        if key is not None:  # evict
            self.num_free_cached -= 1
            del self.cached[key]
            self.keys[block_id] = None
        self.ref_counts[block_id] = 1
        self.fill[block_id] = 0
        return block_id
