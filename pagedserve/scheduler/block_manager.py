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
unused slots are the unfilled tail of each sequence's last block. Every block
operation is O(1): a deque of free ids and a list of reference counts. A block
with a reference count above one is shared on purpose (forked sequences).
"""

from __future__ import annotations

from collections import deque


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, watermark_blocks: int = 0) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks={num_blocks}: the KV pool needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Admission keeps this many blocks free so running sequences can grow a
        # little before someone has to be preempted.
        self.watermark_blocks = watermark_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._tables: dict[int, list[int]] = {}
        self._num_slots: dict[int, int] = {}  # tokens each sequence has slots for
        self._total_slots = 0

    # -- queries -------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_allocated_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def block_table(self, seq_id: int) -> list[int]:
        return self._tables[seq_id]

    def has(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def num_slots(self, seq_id: int) -> int:
        return self._num_slots.get(seq_id, 0)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def num_stored_tokens(self) -> int:
        """Tokens that own a slot (computed, or about to be computed this step)."""
        return self._total_slots

    def blocks_to_append(self, seq_id: int, num_new_tokens: int) -> int:
        """Blocks that `append_slots(seq_id, num_new_tokens)` would take from the pool."""
        table = self._tables.get(seq_id, ())
        return max(0, cdiv(self.num_slots(seq_id) + num_new_tokens, self.block_size) - len(table))

    # -- question / action pairs ---------------------------------------------
    def can_allocate(self, num_tokens: int, num_seqs: int = 1) -> bool:
        """Could `num_seqs` new sequences get slots for `num_tokens` each, above the watermark?"""
        needed = num_seqs * cdiv(num_tokens, self.block_size)
        return len(self._free) - needed >= self.watermark_blocks

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        if seq_id in self._tables:
            raise KeyError(f"sequence {seq_id} already has a block table")
        self._check_free(seq_id, self.blocks_to_append(seq_id, num_tokens))
        self._tables[seq_id] = []
        self._num_slots[seq_id] = 0
        self.append_slots(seq_id, num_tokens)
        return self._tables[seq_id]

    def can_append_slots(self, seq_id: int, num_new_tokens: int) -> bool:
        return self.blocks_to_append(seq_id, num_new_tokens) <= len(self._free)

    def append_slots(self, seq_id: int, num_new_tokens: int) -> list[int]:
        """Reserve slots for `num_new_tokens` more tokens; returns the new block ids."""
        if seq_id not in self._tables:
            raise KeyError(f"sequence {seq_id} has no block table (allocate it first)")
        needed = self.blocks_to_append(seq_id, num_new_tokens)
        self._check_free(seq_id, needed)
        new_blocks = [self._take() for _ in range(needed)]
        self._tables[seq_id].extend(new_blocks)
        self._num_slots[seq_id] += num_new_tokens
        self._total_slots += num_new_tokens
        return new_blocks

    def free(self, seq_id: int) -> None:
        """Release a sequence's blocks (shared blocks return to the pool with their last user)."""
        table = self._tables.pop(seq_id, None)
        if table is None:
            return
        self._total_slots -= self._num_slots.pop(seq_id)
        for block_id in reversed(table):  # tail first: the likeliest to be reused next
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free.append(block_id)

    def _check_free(self, seq_id: int, needed: int) -> None:
        if needed > len(self._free):
            raise RuntimeError(f"sequence {seq_id} needs {needed} blocks, {len(self._free)} are "
                               "free (ask can_allocate / can_append_slots first)")

    def _take(self) -> int:
        block_id = self._free.popleft()
        self._ref_counts[block_id] = 1
        return block_id
