"""Small helpers shared by the BlockManager sharing tests."""

from __future__ import annotations

from pagedserve.scheduler.block_manager import BlockManager, block_key


def chain_keys(token_ids, block_size, extra_key=None):
    """The keys of every full block of `token_ids`, each chained from the one before."""
    keys, parent = [], None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_key(parent, token_ids[start:start + block_size], extra_key)
        keys.append(parent)
    return keys


def free_ids(bm: BlockManager) -> list[int]:
    """The free queue, front (taken next) first."""
    return list(bm.pool.free)


# The CPU pool has no public per-block view: these read it directly.
def cpu_table(bm: BlockManager, seq_id: int) -> list[int]:
    return bm._cpu.tables[seq_id]


def cpu_ref(bm: BlockManager, cpu_id: int) -> int:
    return bm._cpu.ref_counts[cpu_id]


def num_free_cpu(bm: BlockManager) -> int:
    return bm.num_cpu_blocks - bm.num_swapped_blocks


def cached(num_blocks=16, block_size=4, **kwargs) -> BlockManager:
    return BlockManager(num_blocks, block_size, enable_prefix_caching=True, **kwargs)
