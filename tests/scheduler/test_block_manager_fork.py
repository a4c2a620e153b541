"""BlockManager fork and copy-on-write: shared blocks, private copies, release (plain Python)."""

from __future__ import annotations

import pytest
from support.block_manager import cached, chain_keys, free_ids

from pagedserve.scheduler.block_manager import BlockManager

# -- fork and copy-on-write -------------------------------------------------------------------

def test_fork_shares_every_block():
    bm = BlockManager(8, 4)
    assert bm.allocate(0, 6) == [0, 1]
    bm.fork(0, 1)
    assert bm.block_table(1) == [0, 1] and bm.block_table(1) is not bm.block_table(0)
    assert bm.ref_count(0) == bm.ref_count(1) == 2
    assert bm.num_slots(1) == 6
    assert bm.num_allocated_blocks == 2 and bm.num_logical_blocks == 4 and bm.num_free_blocks == 6
    bm.fork(1, 2)  # a fork of a fork
    assert bm.ref_count(0) == bm.ref_count(1) == 3 and bm.num_logical_blocks == 6
    with pytest.raises(KeyError):
        bm.fork(0, 2)
    with pytest.raises(KeyError):
        bm.fork(99, 3)
    assert bm.ref_count(0) == 3 and not bm.has(3)


def test_child_writing_into_shared_partial_block_copies_it():
    bm = BlockManager(8, 4)
    bm.allocate(0, 6)  # [0, 1], block 1 half full
    bm.fork(0, 1)
    assert bm.needs_copy_on_write(1, 1)
    assert not bm.needs_copy_on_write(1, 0)
    assert bm.blocks_to_append(1, 1) == 1  # the copy
    assert bm.blocks_to_append(1, 2) == 1
    assert bm.blocks_to_append(1, 3) == 2  # the copy and a new block
    assert bm.blocks_to_append(1, 3) <= bm.num_free_blocks
    with pytest.raises(RuntimeError, match="copy_on_write"):
        bm.append_slots(1, 1)
    assert bm.block_table(1) == [0, 1] and bm.num_slots(1) == 6 and bm.num_free_blocks == 6
    assert bm.copy_on_write(1) == (1, 2)
    assert bm.block_table(1) == [0, 2] and bm.block_table(0) == [0, 1]
    assert [bm.ref_count(b) for b in (0, 1, 2)] == [2, 1, 1]
    assert not bm.needs_copy_on_write(1, 1) and bm.blocks_to_append(1, 2) == 0
    assert bm.append_slots(1, 2) == [] and bm.num_slots(1) == 8
    # The parent is now the last holder of block 1: it writes in place.
    assert not bm.needs_copy_on_write(0, 1) and bm.blocks_to_append(0, 2) == 0
    with pytest.raises(RuntimeError):
        bm.copy_on_write(0)
    assert bm.append_slots(0, 2) == [] and bm.block_table(0) == [0, 1]
    assert bm.num_allocated_blocks == 3 and bm.num_free_blocks == 5


def test_parent_writing_first_gets_the_copy():
    bm = BlockManager(8, 4)
    bm.allocate(0, 5)
    bm.fork(0, 1)
    assert bm.needs_copy_on_write(0, 1)
    assert bm.copy_on_write(0) == (1, 2)
    bm.append_slots(0, 1)
    assert bm.block_table(0) == [0, 2] and bm.block_table(1) == [0, 1]
    assert not bm.needs_copy_on_write(1, 3)
    assert bm.append_slots(1, 3) == [] and bm.num_slots(1) == 8


def test_copy_on_write_with_three_holders():
    bm = BlockManager(8, 4)
    bm.allocate(0, 2)
    bm.fork(0, 1)
    bm.fork(0, 2)
    assert bm.ref_count(0) == 3
    assert bm.copy_on_write(1) == (0, 1) and bm.ref_count(0) == 2
    assert bm.copy_on_write(2) == (0, 2) and bm.ref_count(0) == 1
    assert not bm.needs_copy_on_write(0, 1)
    assert [bm.block_table(s) for s in (0, 1, 2)] == [[0], [1], [2]]


def test_copy_on_write_on_a_full_pool_is_refused_cleanly():
    bm = BlockManager(2, 4)
    bm.allocate(0, 2)
    bm.fork(0, 1)
    bm.allocate(2, 1)  # the last free block
    assert bm.needs_copy_on_write(1, 1) and bm.blocks_to_append(1, 1) > bm.num_free_blocks
    with pytest.raises(RuntimeError):
        bm.copy_on_write(1)
    assert bm.block_table(1) == [0] and bm.ref_count(0) == 2 and bm.num_free_blocks == 0


def test_shared_full_last_block_needs_no_copy():
    bm = BlockManager(8, 4)
    bm.allocate(0, 8)  # [0, 1], both full
    bm.fork(0, 1)
    assert not bm.needs_copy_on_write(1, 1)
    assert bm.blocks_to_append(1, 1) == 1
    assert bm.append_slots(1, 1) == [2]
    assert bm.block_table(1) == [0, 1, 2] and bm.ref_count(0) == bm.ref_count(1) == 2
    with pytest.raises(RuntimeError):
        bm.copy_on_write(1)
    assert bm.append_slots(0, 4) == [3]


def test_copy_is_not_a_cache_entry_until_it_fills():
    bm = cached(block_size=2)
    tokens = [1, 2, 3]
    bm.allocate(0, 3, tokens)  # [0 cached, 1 partial]
    bm.fork(0, 1)
    src, dst = bm.copy_on_write(1)
    assert (src, dst) == (1, 2) and bm.cached_key(dst) is None
    bm.append_slots(1, 1, tokens + [9])
    assert bm.cached_key(dst) == chain_keys(tokens + [9], 2)[1]
    bm.append_slots(0, 1, tokens + [8])
    assert bm.cached_key(src) == chain_keys(tokens + [8], 2)[1]
    assert bm.computed_blocks([1, 2, 3, 9, 0]) == [0, 2]
    assert bm.computed_blocks([1, 2, 3, 8, 0]) == [0, 1]


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 0, 2), (0, 2, 1)])
def test_freeing_parent_and_children_returns_everything(order):
    bm = BlockManager(10, 4)
    bm.allocate(0, 6)  # [0, 1]
    bm.fork(0, 1)
    assert bm.copy_on_write(1) == (1, 2)
    bm.append_slots(1, 5)  # [0, 2, 3]
    bm.fork(0, 2)  # [0, 1]
    assert bm.copy_on_write(0) == (1, 4)
    bm.append_slots(0, 2)  # [0, 4]
    assert [bm.ref_count(b) for b in range(5)] == [3, 1, 1, 1, 1]
    freed = []
    for seq_id in order:
        bm.free(seq_id)
        freed.append(seq_id)
        held = [b for s in (0, 1, 2) if s not in freed for b in bm.block_table(s)]
        for block_id in range(10):
            assert bm.ref_count(block_id) == held.count(block_id)
        assert bm.num_allocated_blocks == len(set(held))
    assert bm.num_free_blocks == 10 and bm.num_stored_tokens() == 0
    assert sorted(free_ids(bm)) == list(range(10))


def test_stored_tokens_count_each_physical_slot_once():
    # 6 tokens in two blocks of 4, shared by a fork: still 6 stored tokens in 8 slots.
    bm = BlockManager(4, 4, num_cpu_blocks=4)
    bm.allocate(0, 6)
    bm.fork(0, 1)
    assert bm.num_stored_tokens() == 6 and bm.num_allocated_blocks == 2
    # The child's write copies the partial block: that copy holds 2 + 1 tokens.
    bm.copy_on_write(1)
    bm.append_slots(1, 1)
    assert bm.num_stored_tokens() == 6 + 3
    # Swapped-out sequences hold no GPU slots; swapping back restores them.
    bm.swap_out([0, 1])
    assert bm.num_stored_tokens() == 0 and bm.num_allocated_blocks == 0
    bm.swap_in([0, 1])
    assert bm.num_stored_tokens() == 9 and bm.num_allocated_blocks == 3
    bm.free(1)
    assert bm.num_stored_tokens() == 6
    bm.free(0)
    assert bm.num_stored_tokens() == 0


def test_stored_tokens_count_prefix_hits_once():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    prompt = list(range(10))
    bm.allocate(0, 10, prompt)
    hits = bm.computed_blocks(prompt)
    assert len(hits) == 2
    bm.allocate(1, 10, prompt, computed=hits)
    # Two shared full blocks (8 tokens) plus each sequence's own 2-token tail.
    assert bm.num_stored_tokens() == 8 + 2 + 2
    bm.free(0)
    bm.free(1)
    assert bm.num_stored_tokens() == 0
    # A hit on a free cached block brings its tokens back into the count.
    bm.allocate(2, 9, prompt[:9], computed=bm.computed_blocks(prompt[:9]))
    assert bm.num_stored_tokens() == 9
