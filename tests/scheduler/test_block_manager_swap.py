"""BlockManager swapping: groups move to the CPU pool and back with their sharing (plain Python)."""

from __future__ import annotations

import pytest
from support.block_manager import cached, chain_keys, cpu_ref, cpu_table, free_ids, num_free_cpu

from pagedserve.scheduler.block_manager import BlockManager

# -- swapping ----------------------------------------------------------------------------------

def _forked_group(bm: BlockManager) -> None:
    """Seqs 0, 1, 2: 0 and 2 share [a, b]; 1 shares a and has its own last block."""
    bm.allocate(0, 6)
    bm.fork(0, 1)
    bm.copy_on_write(1)
    bm.fork(0, 2)


def test_swap_out_moves_shared_blocks_once():
    bm = BlockManager(8, 4, num_cpu_blocks=8)
    _forked_group(bm)
    tables = {s: list(bm.block_table(s)) for s in (0, 1, 2)}
    assert tables == {0: [0, 1], 1: [0, 2], 2: [0, 1]}
    assert [bm.ref_count(b) for b in (0, 1, 2)] == [3, 2, 1]
    assert bm.can_swap_out([0, 1, 2])
    pairs = bm.swap_out([0, 1, 2])
    mapping = dict(pairs)
    assert len(pairs) == 3 and set(mapping) == {0, 1, 2}  # 3 distinct blocks, 6 table entries
    assert len(set(mapping.values())) == 3
    assert bm.num_swapped_blocks == 3 and num_free_cpu(bm) == 5
    for seq_id in (0, 1, 2):
        assert bm.is_swapped(seq_id) and not bm.has(seq_id)
        assert cpu_table(bm, seq_id) == [mapping[b] for b in tables[seq_id]]
        assert bm.num_slots(seq_id) == 6
    # CPU ref counts mirror the GPU ones; the GPU blocks are all free again.
    assert [cpu_ref(bm, mapping[b]) for b in (0, 1, 2)] == [3, 2, 1]
    assert all(bm.ref_count(b) == 0 for b in range(8))
    assert bm.num_free_blocks == 8 and bm.num_allocated_blocks == 0 and bm.num_logical_blocks == 0


def test_swap_in_restores_the_sharing_structure():
    bm = BlockManager(8, 4, num_cpu_blocks=8)
    _forked_group(bm)
    bm.swap_out([0, 1, 2])
    cpu = {s: list(cpu_table(bm, s)) for s in (0, 1, 2)}
    other = bm.allocate(9, 12)  # takes three GPU blocks meanwhile
    assert bm.blocks_to_swap_in([0, 1, 2]) == 3
    pairs = bm.swap_in([0, 1, 2])
    back = dict(pairs)
    assert len(pairs) == 3 and set(back) == set(cpu[0] + cpu[1])
    assert len(set(back.values())) == 3 and not set(back.values()) & set(other)
    for seq_id in (0, 1, 2):
        assert bm.has(seq_id) and not bm.is_swapped(seq_id)
        assert bm.block_table(seq_id) == [back[c] for c in cpu[seq_id]]
        assert bm.num_slots(seq_id) == 6
    t0, t1, t2 = (bm.block_table(s) for s in (0, 1, 2))
    assert t0 == t2 and t0[0] == t1[0] and t0[1] != t1[1]
    assert [bm.ref_count(b) for b in (t0[0], t0[1], t1[1])] == [3, 2, 1]
    assert bm.num_swapped_blocks == 0 and all(cpu_ref(bm, c) == 0 for c in range(8))
    assert bm.num_allocated_blocks == 6 and bm.num_free_blocks == 2
    # Still shared: the next write into the partial block copies it.
    assert bm.needs_copy_on_write(0, 1) and bm.needs_copy_on_write(2, 1)
    assert not bm.needs_copy_on_write(1, 1)


def test_swap_out_of_part_of_a_group():
    bm = BlockManager(8, 4, num_cpu_blocks=8)
    bm.allocate(0, 6)
    bm.fork(0, 1)
    pairs = bm.swap_out([1])
    assert sorted(g for g, _ in pairs) == [0, 1]
    assert bm.ref_count(0) == bm.ref_count(1) == 1 and bm.block_table(0) == [0, 1]
    assert bm.num_free_blocks == 6  # the parent still holds both
    bm.swap_in([1])
    t1 = bm.block_table(1)
    assert not set(t1) & {0, 1} and all(bm.ref_count(b) == 1 for b in t1)
    assert not bm.needs_copy_on_write(1, 1)


def test_can_swap_out_counts_distinct_blocks():
    bm = BlockManager(8, 4, num_cpu_blocks=2)
    _forked_group(bm)  # 3 distinct blocks, 6 table entries
    assert not bm.can_swap_out([0, 1, 2])
    assert bm.can_swap_out([0, 2])  # [0, 1] shared: 2 blocks
    assert not bm.can_swap_out([0, 1])
    bm.swap_out([0, 2])
    assert bm.num_swapped_blocks == 2 and not bm.can_swap_out([1])
    bm = BlockManager(8, 4, num_cpu_blocks=3)
    _forked_group(bm)
    assert bm.can_swap_out([0, 1, 2])
    assert BlockManager(4, 4).can_swap_out([])


def test_no_cpu_pool_cannot_swap():
    bm = BlockManager(4, 4)
    bm.allocate(0, 1)
    bm.allocate(1, 0)
    assert not bm.can_swap_out([0])
    assert bm.can_swap_out([1])  # nothing to move


def test_free_of_a_swapped_sequence_returns_its_cpu_blocks():
    bm = BlockManager(8, 4, num_cpu_blocks=4)
    _forked_group(bm)
    mapping = dict(bm.swap_out([0, 1, 2]))
    bm.free(1)  # its own last block goes; the shared first block stays
    assert not bm.is_swapped(1) and bm.num_slots(1) == 0
    assert bm.num_swapped_blocks == 2
    assert cpu_ref(bm, mapping[0]) == 2 and cpu_ref(bm, mapping[2]) == 0
    bm.free(0)
    assert bm.num_swapped_blocks == 2 and cpu_ref(bm, mapping[1]) == 1
    bm.free(2)
    assert bm.num_swapped_blocks == 0 and num_free_cpu(bm) == 4
    assert bm.num_free_blocks == 8 and bm.num_stored_tokens() == 0
    bm.free(2)  # twice: nothing
    assert num_free_cpu(bm) == 4


def test_swap_in_refused_without_room_changes_nothing():
    bm = BlockManager(4, 4, num_cpu_blocks=4)
    bm.allocate(0, 9)
    bm.swap_out([0])
    bm.allocate(1, 8)
    assert bm.blocks_to_swap_in([0]) == 3 and bm.num_free_blocks == 2
    with pytest.raises(RuntimeError):
        bm.swap_in([0])
    assert bm.is_swapped(0) and not bm.has(0) and bm.num_swapped_blocks == 3
    assert bm.num_free_blocks == 2


def test_swapped_blocks_come_back_writable():
    bm = BlockManager(6, 2, num_cpu_blocks=6)
    bm.allocate(0, 3)
    bm.swap_out([0])
    bm.swap_in([0])
    assert bm.blocks_to_append(0, 3) == 1
    bm.append_slots(0, 3)
    assert bm.num_slots(0) == 6 and len(bm.block_table(0)) == 3


def test_swap_in_recaches_full_blocks_whose_key_is_gone():
    tokens = [1, 2, 3, 4, 5]
    keys = chain_keys(tokens, 2)
    bm = cached(num_blocks=6, block_size=2, num_cpu_blocks=6)
    assert bm.allocate(0, 5, tokens) == [0, 1, 2]
    bm.swap_out([0])
    # The GPU copies stay cached while free.
    assert bm.num_cached_blocks == 2 and bm.computed_blocks(tokens) == [0, 1]
    # Push both out of the cache, then give the pool back.
    bm.allocate(1, 12)
    bm.free(1)
    assert bm.num_cached_blocks == 0 and bm.computed_blocks(tokens) == []
    bm.swap_in([0])
    table = bm.block_table(0)
    assert [bm.cached_key(b) for b in table] == [keys[0], keys[1], None]
    assert bm.computed_blocks(tokens) == table[:2]


def _swapped_out_prompt(tokens: list[int]) -> BlockManager:
    """Sequence 0 holding `tokens` in blocks of 2, swapped out; its GPU copies stay cached."""
    bm = cached(num_blocks=6, block_size=2, num_cpu_blocks=6)
    bm.allocate(0, len(tokens), tokens)
    bm.swap_out([0])
    return bm


def test_swap_in_leaves_keys_cached_elsewhere_alone():
    tokens = [1, 2, 3, 4, 5]
    keys = chain_keys(tokens, 2)
    bm = _swapped_out_prompt(tokens)
    assert free_ids(bm) == [2, 3, 4, 5, 1, 0]
    bm.swap_in([0])  # takes 2, 3, 4: the old cached copies stay
    table = bm.block_table(0)
    assert table == [2, 3, 4] and all(bm.cached_key(b) is None for b in table)
    assert (bm.cached_key(0), bm.cached_key(1)) == (keys[0], keys[1])
    assert bm.computed_blocks(tokens) == [0, 1]


def test_swap_in_recaches_only_the_evicted_key():
    tokens = [1, 2, 3, 4, 5]
    keys = chain_keys(tokens, 2)
    bm = _swapped_out_prompt(tokens)
    bm.allocate(1, 10)  # 2, 3, 4, 5, then evicts 1 (the tail, freed first)
    assert bm.cached_key(1) is None and bm.cached_key(0) == keys[0]
    bm.free(1)
    bm.swap_in([0])
    table = bm.block_table(0)
    assert 0 not in table
    assert [bm.cached_key(b) for b in table] == [None, keys[1], None]
    assert bm.computed_blocks(tokens) == [0, table[1]]


def test_swap_out_without_room_is_refused_and_leaves_no_trace():
    bm = BlockManager(4, 2, num_cpu_blocks=1)
    bm.allocate(0, 4)
    with pytest.raises(RuntimeError, match="ask can_swap_out first"):
        bm.swap_out([0])
    assert bm.num_swapped_blocks == 0 and bm.has(0) and not bm.is_swapped(0)
