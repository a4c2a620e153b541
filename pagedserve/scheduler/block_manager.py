"""The global block manager: which physical KV blocks hold which sequence's tokens.

Plain Python on integer ids, no torch: one instance serves every tensor-parallel
rank, since each rank holds the same block ids for its own heads.

    block table of a sequence with 37 tokens, block_size 16:

      logical block   0            1            2
                   +----------+----------+----------+
      physical id  |    7     |    2     |    11    |   -> slots 7*16+0..15, 2*16+0..15, 11*16+0..4
                   +----------+----------+----------+
      tokens          0..15      16..31     32..36 (11 slots still free)

Blocks are allocated on demand, as tokens are about to be computed, so the only
unused slots are the unfilled tail of each sequence's last block.

Sharing. A block's reference count is the number of tables holding it:

* `fork` gives a child sequence its parent's table (parallel samples, beams);
  before a sequence writes into a shared, partly filled last block it takes a
  private copy (`copy_on_write`), and the worker copies the block's K/V.
* Prefix caching: a full block is keyed by its prefix (block_keys.py), and a
  new sequence starts from the longest chain of cached blocks matching its
  tokens (`computed_blocks`).

The blocks themselves (reference counts, filled slots, the free queue with its
cached blocks evicted last, the prefix-cache index) are the pool's
(block_pool.py); this manager keeps each sequence's table.

Swapping moves a group's blocks to a CPU pool (cpu_pool.py) with the same ids
scheme and back; shared blocks move once.

Sliding windows. When every layer of the model attends over a window of W
positions (`sliding_window`), a token at position p reads nothing before
p - W + 1, so the blocks wholly before the next token's window are released
(`release_before_window`): the table keeps their places as holes (block id
`HOLE`, which no kernel reads, since each starts at the window), and a
sequence holds about W / block_size + 1 blocks however long it grows. A
released full block keeps its prefix-cache key, so other requests may still
hit it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

from pagedserve.math_utils import cdiv
from pagedserve.scheduler.block_keys import BlockKey, block_key
from pagedserve.scheduler.block_pool import BlockPool
from pagedserve.scheduler.cpu_pool import CpuPool

# The table entry of a block released out of every layer's window: a valid id for the
# kernels' tables, never read (they start at the window).
HOLE = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, watermark_blocks: int = 0, *,
                 num_cpu_blocks: int = 0, enable_prefix_caching: bool = False,
                 sliding_window: int | None = None) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks={num_blocks}: the KV pool needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Admission keeps this many blocks free so running sequences can grow a
        # little before someone has to be preempted.
        self.watermark_blocks = watermark_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        # Leading table entries released out of the window, per sequence (kept while
        # it is swapped out).
        self._holes: dict[int, int] = {}
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self._tables: dict[int, list[int]] = {}
        self._num_slots: dict[int, int] = {}  # tokens each sequence has slots for
        self._seq_keys: dict[int, list[BlockKey]] = {}  # keys of each sequence's full blocks
        self._extra_keys: dict[int, str | None] = {}
        # The CPU pool: tables of swapped-out sequences, and its own ref counts.
        self.num_cpu_blocks = num_cpu_blocks
        self._cpu = CpuPool(num_cpu_blocks)
        # Prefix cache accounting, in tokens.
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # -- queries -------------------------------------------------------------
    @property
    def num_total_blocks(self) -> int:
        """The pool's blocks (vLLM's name for `num_blocks`): always
        num_allocated_blocks + num_free_blocks."""
        return self.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds, cached ones included: a cached prefix block
        nobody holds is reclaimable (evicted, LRU, when a fresh block is needed).
        This is get_memory_stats()'s `free_blocks`; `num_cached_blocks` says how
        many of them still hold a cached prefix."""
        return len(self.pool.free)

    @property
    def num_allocated_blocks(self) -> int:
        """Blocks some sequence holds (a shared block counts once)."""
        return self.num_blocks - len(self.pool.free)

    @property
    def num_cached_blocks(self) -> int:
        """Free blocks that still hold a cached prefix."""
        return self.pool.num_free_cached

    def cached_block_keys(self) -> list[BlockKey]:
        """The prefix-cache keys of every cached block, in use or free, oldest first."""
        return list(self.pool.cached)

    @property
    def num_logical_blocks(self) -> int:
        """Blocks held, over all tables; above num_allocated_blocks when blocks are shared."""
        return sum(len(table) - self._holes.get(seq_id, 0)
                   for seq_id, table in self._tables.items())

    def num_holes(self, seq_id: int) -> int:
        """Leading table entries released out of the window."""
        return self._holes.get(seq_id, 0)

    @property
    def num_swapped_blocks(self) -> int:
        return self._cpu.num_used

    def block_table(self, seq_id: int) -> list[int]:
        return self._tables[seq_id]

    def has(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def is_swapped(self, seq_id: int) -> bool:
        return seq_id in self._cpu.tables

    def num_slots(self, seq_id: int) -> int:
        return self._num_slots.get(seq_id, 0)

    def ref_count(self, block_id: int) -> int:
        return self.pool.ref_counts[block_id]

    def cached_key(self, block_id: int) -> BlockKey | None:
        return self.pool.keys[block_id]

    def num_stored_tokens(self) -> int:
        """Filled slots of the allocated GPU blocks (computed, or being computed this step).

        Each physical slot counts once however many sequences share its block,
        and swapped-out sequences hold none, so this never exceeds the
        allocated blocks' slots.
        """
        return self.pool.stored

    def computed_blocks(self, token_ids: Sequence[int], extra_key: str | None = None) -> list[int]:
        """The longest chain of cached blocks holding a prefix of `token_ids`.

        The last token is always left to compute, since its logits are needed.
        """
        return self.pool.longest_prefix(token_ids[:-1], extra_key)

    def blocks_to_allocate(self, num_tokens: int, computed: Sequence[int] = (),
                           claimed: Collection[int] = ()) -> int:
        """Free-queue blocks a new sequence takes for `num_tokens` slots reusing `computed`.

        `claimed`: cached blocks that sequences allocated with it (one request's
        samples, recomputed together) already take from the free queue; a block two
        of them reuse leaves the queue once.
        """
        reused_free = sum(1 for block_id in computed
                          if self.pool.ref_counts[block_id] == 0 and block_id not in claimed)
        return reused_free + max(0, cdiv(num_tokens, self.block_size) - len(computed))

    def blocks_to_append(self, seq_id: int, num_new_tokens: int) -> int:
        """Blocks that copy_on_write + append_slots(seq_id, num_new_tokens) take from the pool."""
        table = self._tables.get(seq_id, ())
        grow = max(0, cdiv(self.num_slots(seq_id) + num_new_tokens, self.block_size) - len(table))
        return grow + int(self.needs_copy_on_write(seq_id, num_new_tokens))

    # -- actions (the queries above say how many free blocks each takes) -----
    def allocate(self, seq_id: int, num_tokens: int, token_ids: Sequence[int] | None = None,
                 computed: Sequence[int] = (), extra_key: str | None = None) -> list[int]:
        """A table for a new sequence: the `computed` blocks, then fresh ones up to `num_tokens`.

        With `token_ids` (the sequence's tokens so far), full blocks become
        prefix-cache entries and hits are counted.
        """
        if seq_id in self._tables:
            raise KeyError(f"sequence {seq_id} already has a block table")
        if len(computed) * self.block_size > num_tokens:
            raise ValueError(f"{len(computed)} computed blocks exceed num_tokens={num_tokens}")
        computed_keys = self.pool.keys_of(computed, token_ids, extra_key)
        self._check_free(seq_id, self.blocks_to_allocate(num_tokens, computed))
        for block_id in computed:
            self.pool.hold(block_id)
        self._tables[seq_id] = list(computed)
        self._seq_keys[seq_id] = computed_keys
        self._extra_keys[seq_id] = extra_key
        filled = len(computed) * self.block_size
        self._num_slots[seq_id] = filled
        if token_ids is not None and self.enable_prefix_caching:
            self.prefix_query_tokens += len(token_ids)
            self.prefix_hit_tokens += filled
        self.append_slots(seq_id, num_tokens - filled, token_ids)
        return self._tables[seq_id]

    def append_slots(self, seq_id: int, num_new_tokens: int,
                     token_ids: Sequence[int] | None = None) -> list[int]:
        """Reserve slots for `num_new_tokens` more tokens; returns the new block ids.

        A shared, partly filled last block must have been copied first
        (`copy_on_write`). With `token_ids`, blocks this fills become cached.
        """
        if seq_id not in self._tables:
            raise KeyError(f"sequence {seq_id} has no block table (allocate it first)")
        if self.needs_copy_on_write(seq_id, num_new_tokens):
            raise RuntimeError(f"sequence {seq_id} would write into shared block "
                               f"{self._tables[seq_id][-1]} (call copy_on_write first)")
        table, bs = self._tables[seq_id], self.block_size
        start = self._num_slots[seq_id]
        end = start + num_new_tokens
        needed = max(0, cdiv(end, bs) - len(table))
        new_blocks = []
        if needed:
            self._check_free(seq_id, needed)
            new_blocks = [self.pool.take() for _ in range(needed)]
            table.extend(new_blocks)
        for index in range(start // bs, cdiv(end, bs)):
            self.pool.fill[table[index]] += min(end, (index + 1) * bs) - max(start, index * bs)
        self._num_slots[seq_id] = end
        self.pool.stored += num_new_tokens
        if token_ids is not None and self.enable_prefix_caching:
            self._cache_full_blocks(seq_id, token_ids)
        return new_blocks

    def trim_slots(self, seq_id: int, num_slots: int) -> None:
        """Give back the slots past the first `num_slots` (speculated tokens the target
        refused), and the blocks only they used, on the GPU or, for a sequence swapped
        out while its step ran, on the CPU. Those slots were never cached: a block's
        key is made from verified tokens only (`_cache_full_blocks`), and blocks
        holding only drafts are the sequence's own."""
        bs, end = self.block_size, self._num_slots[seq_id]
        swapped = seq_id not in self._tables
        holes = self.num_holes(seq_id)
        if not holes * bs <= num_slots <= end:
            raise ValueError(f"sequence {seq_id} holds slots up to {end}; cannot trim to "
                             f"{num_slots}")
        # A swapped-out table starts after the holes (swap_out).
        table, offset = ((self._cpu.tables[seq_id], holes) if swapped
                         else (self._tables[seq_id], 0))
        fill = self._cpu.fill if swapped else self.pool.fill
        for index in range(num_slots // bs, cdiv(end, bs)):
            fill[table[index - offset]] -= min(end, (index + 1) * bs) - max(num_slots,
                                                                           index * bs)
        keep = cdiv(num_slots, bs) - offset
        if swapped:
            self._cpu.drop_last(seq_id, len(table) - keep)
        else:
            while len(table) > keep:
                self.pool.release(table.pop())
            self.pool.stored -= end - num_slots
        self._num_slots[seq_id] = num_slots
        del self._seq_keys[seq_id][num_slots // bs:]

    def release_before_window(self, seq_id: int, first_position: int) -> int:
        """Release the blocks wholly before the window of a query at `first_position`
        (positions < first_position - sliding_window + 1); returns how many. The last
        block always stays."""
        if self.sliding_window is None:
            return 0
        table = self._tables[seq_id]
        holes = self._holes.get(seq_id, 0)
        until = min((first_position - self.sliding_window + 1) // self.block_size,
                    len(table) - 1)
        for index in range(holes, until):
            self.pool.release(table[index])
            table[index] = HOLE
        if until > holes:
            self._holes[seq_id] = until
        return max(0, until - holes)

    def needs_copy_on_write(self, seq_id: int, num_new_tokens: int) -> bool:
        """Would these tokens land in a partly filled last block that others hold too?"""
        table = self._tables.get(seq_id)
        if not table or num_new_tokens <= 0 or self.pool.ref_counts[table[-1]] == 1:
            return False  # the common case, decided first: a private last block
        return self._num_slots[seq_id] % self.block_size > 0

    def copy_on_write(self, seq_id: int) -> tuple[int, int]:
        """Give the sequence a private copy of its shared last block; returns (src, dst)."""
        if not self.needs_copy_on_write(seq_id, 1):
            raise RuntimeError(f"sequence {seq_id}'s last block is not a shared partial block")
        self._check_free(seq_id, 1)
        table = self._tables[seq_id]
        src = table[-1]
        self.pool.ref_counts[src] -= 1  # others still hold it: never reaches 0 here
        table[-1] = dst = self.pool.take()
        self.pool.fill[dst] = self.pool.fill[src]
        self.pool.stored += self.pool.fill[src]
        return src, dst

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child holds every block of the parent's table (ref counts + 1).

        A parent swapped out while the step that samples its fork was in flight
        shares its CPU blocks: the child is swapped in with it.
        """
        if child_id in self._tables or child_id in self._cpu.tables:
            raise KeyError(f"sequence {child_id} already has a block table")
        holes = self._holes.get(parent_id, 0)
        if parent_id in self._cpu.tables:
            self._cpu.hold(child_id, list(self._cpu.tables[parent_id]))
        else:
            table = self._tables[parent_id]
            for block_id in table[holes:]:
                self.pool.ref_counts[block_id] += 1
            self._tables[child_id] = list(table)
        if holes:
            self._holes[child_id] = holes
        self._num_slots[child_id] = self._num_slots[parent_id]
        self._seq_keys[child_id] = list(self._seq_keys[parent_id])
        self._extra_keys[child_id] = self._extra_keys[parent_id]

    def free(self, seq_id: int) -> None:
        """Release a sequence's blocks (GPU or swapped); shared ones stay with others."""
        self._seq_keys.pop(seq_id, None)
        self._extra_keys.pop(seq_id, None)
        holes = self._holes.pop(seq_id, 0)
        if self._cpu.release(seq_id) is not None:
            self._num_slots.pop(seq_id)
            return
        table = self._tables.pop(seq_id, None)
        if table is None:
            return
        self._num_slots.pop(seq_id)
        for block_id in reversed(table[holes:]):  # tail first: evicted before the shared head
            self.pool.release(block_id)

    # -- swapping --------------------------------------------------------------
    def can_swap_out(self, seq_ids: Iterable[int]) -> bool:
        return len(self._distinct(seq_ids)) <= len(self._cpu.free)

    def swap_out(self, seq_ids: Iterable[int]) -> list[tuple[int, int]]:
        """Move these sequences' blocks to the CPU pool; returns (gpu block, cpu block) pairs."""
        seq_ids = list(seq_ids)
        if not self.can_swap_out(seq_ids):
            raise RuntimeError(f"sequences {seq_ids} need more CPU blocks than the "
                               f"{len(self._cpu.free)} free (ask can_swap_out first)")
        mapping = {block_id: self._cpu.free.popleft() for block_id in self._distinct(seq_ids)}
        for block_id, cpu_id in mapping.items():
            self._cpu.fill[cpu_id] = self.pool.fill[block_id]
        for seq_id in seq_ids:
            table = self._tables.pop(seq_id)[self._holes.get(seq_id, 0):]
            self._cpu.hold(seq_id, [mapping[block_id] for block_id in table])
            for block_id in reversed(table):
                self.pool.release(block_id)
        return list(mapping.items())

    def blocks_to_swap_in(self, seq_ids: Iterable[int]) -> int:
        return len(self._cpu.distinct(seq_ids))

    def swap_in(self, seq_ids: Iterable[int]) -> list[tuple[int, int]]:
        """Bring swapped sequences back; returns (cpu block, gpu block) pairs."""
        seq_ids = list(seq_ids)
        cpu_blocks = self._cpu.distinct(seq_ids)
        self._check_free(seq_ids[0], len(cpu_blocks))
        mapping = {cpu_id: self.pool.take() for cpu_id in cpu_blocks}
        for cpu_id, block_id in mapping.items():
            self.pool.ref_counts[block_id] = 0
            self.pool.fill[block_id] = self._cpu.fill[cpu_id]
            self.pool.stored += self._cpu.fill[cpu_id]
        for seq_id in seq_ids:
            cpu_table = self._cpu.release(seq_id)
            assert cpu_table is not None
            holes = self._holes.get(seq_id, 0)
            self._tables[seq_id] = [HOLE] * holes + [mapping[cpu_id] for cpu_id in cpu_table]
            for cpu_id in cpu_table:
                self.pool.ref_counts[mapping[cpu_id]] += 1
            # Its full blocks are valid prefixes again: the keys cover only those.
            keys = self._seq_keys[seq_id][holes:]
            for block_id, key in zip(self._tables[seq_id][holes:], keys, strict=False):
                self.pool.register(block_id, key)
        return list(mapping.items())

    # -- internals -----------------------------------------------------------
    def _cache_full_blocks(self, seq_id: int, token_ids: Sequence[int]) -> None:
        keys = self._seq_keys[seq_id]
        table = self._tables[seq_id]
        bs = self.block_size
        full = min(self._num_slots[seq_id], len(token_ids)) // bs
        extra_key = self._extra_keys[seq_id]
        holes = self._holes.get(seq_id, 0)
        for index in range(len(keys), full):
            key = block_key(keys[-1] if keys else None, token_ids[index * bs:(index + 1) * bs],
                            extra_key)
            keys.append(key)
            if index >= holes:  # a hole's block was released: nothing left to cache
                self.pool.register(table[index], key)

    def _check_free(self, seq_id: int, needed: int) -> None:
        free = len(self.pool.free)
        if needed > free:
            raise RuntimeError(f"sequence {seq_id} needs {needed} blocks, {free} are free "
                               "(ask blocks_to_allocate / blocks_to_append first)")

    def _distinct(self, seq_ids: Iterable[int]) -> list[int]:
        return list(dict.fromkeys(block_id for seq_id in seq_ids
                                  for block_id in self._tables[seq_id][self.num_holes(seq_id):]))
