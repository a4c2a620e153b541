"""The CPU pool that swapping moves sequences' blocks to (BlockManager.swap_out and
swap_in): its own block ids, tables and reference counts, and each block's filled
slots, so that a block comes back to the GPU pool as it left. Blocks that several
tables share (parallel samples, beams) are held once and counted per table.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class CpuPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.tables: dict[int, list[int]] = {}
        self.fill = [0] * num_blocks  # filled slots of each block

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def hold(self, seq_id: int, table: list[int]) -> None:
        """`seq_id` holds these CPU blocks (a swapped-out table, or a fork's copy of one)."""
        self.tables[seq_id] = table
        for block_id in table:
            self.ref_counts[block_id] += 1

    def release(self, seq_id: int) -> list[int] | None:
        """Drop a sequence's CPU table; its blocks no one else holds are free again.
        Returns the table, or None when the sequence has none here."""
        table = self.tables.pop(seq_id, None)
        for block_id in table or ():
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free.append(block_id)
        return table

    def drop_last(self, seq_id: int, count: int) -> None:
        """Drop the last `count` blocks of a sequence's table (slots it gave back)."""
        table = self.tables[seq_id]
        for _ in range(count):
            block_id = table.pop()
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.fill[block_id] = 0
                self.free.append(block_id)

    def distinct(self, seq_ids: Iterable[int]) -> list[int]:
        return list(dict.fromkeys(block_id for seq_id in seq_ids
                                  for block_id in self.tables[seq_id]))
