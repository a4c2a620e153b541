"""BlockManager: block tables, ref counts and the free pool (plain Python, no torch)."""

from __future__ import annotations

import pytest

from pagedserve.math_utils import cdiv
from pagedserve.scheduler.block_manager import BlockManager


def _check_consistent(bm: BlockManager) -> None:
    """Every structural invariant of a pool where nothing is shared on purpose."""
    free = list(bm.pool.free)
    assert len(free) == len(set(free)), "a block is in the free list twice"
    assert bm.num_free_blocks + bm.num_allocated_blocks == bm.num_blocks
    owners: dict[int, int] = {}
    total_slots = 0
    for seq_id, table in bm._tables.items():
        for block_id in table:
            assert 0 <= block_id < bm.num_blocks
            assert block_id not in owners, (f"block {block_id} in seqs {owners[block_id]} "
                                            f"and {seq_id}")
            owners[block_id] = seq_id
            assert bm.ref_count(block_id) == 1
        assert len(table) == cdiv(bm.num_slots(seq_id), bm.block_size)
        total_slots += bm.num_slots(seq_id)
    assert not owners.keys() & set(free), "a block is both owned and free"
    assert len(owners) == bm.num_allocated_blocks
    assert len(owners) + len(free) == bm.num_blocks
    for block_id in free:
        assert bm.ref_count(block_id) == 0
    assert bm.num_stored_tokens() == total_slots


# -- construction -------------------------------------------------------------

def test_new_pool_is_all_free():
    bm = BlockManager(8, 4)
    assert bm.num_free_blocks == 8 and bm.num_allocated_blocks == 0
    assert bm.num_stored_tokens() == 0
    assert all(bm.ref_count(b) == 0 for b in range(8))
    assert not bm.has(0) and bm.num_slots(0) == 0
    _check_consistent(bm)


@pytest.mark.parametrize("num_blocks", [0, -1])
def test_empty_pool_rejected(num_blocks):
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks, 16)


def test_cdiv():
    assert [cdiv(n, 4) for n in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]


# -- allocate / append ----------------------------------------------------------

def test_allocate_takes_ceil_blocks():
    bm = BlockManager(10, 16)
    table = bm.allocate(0, 37)
    assert len(table) == 3 and bm.block_table(0) == table
    assert bm.num_slots(0) == 37 and bm.num_stored_tokens() == 37
    assert bm.num_free_blocks == 7 and bm.num_allocated_blocks == 3
    assert all(bm.ref_count(b) == 1 for b in table)
    _check_consistent(bm)


@pytest.mark.parametrize("num_tokens, blocks",
                         [(1, 1), (15, 1), (16, 1), (17, 2), (32, 2), (33, 3)])
def test_allocate_block_boundaries(num_tokens, blocks):
    bm = BlockManager(4, 16)
    assert len(bm.allocate(7, num_tokens)) == blocks
    assert bm.num_free_blocks == 4 - blocks


def test_allocate_zero_tokens_takes_no_block():
    bm = BlockManager(2, 4)
    assert bm.allocate(0, 0) == []
    assert bm.has(0) and bm.num_free_blocks == 2
    assert bm.append_slots(0, 1) != [] and bm.num_free_blocks == 1


def test_allocate_twice_rejected():
    bm = BlockManager(4, 4)
    bm.allocate(0, 3)
    with pytest.raises(KeyError):
        bm.allocate(0, 1)
    assert bm.num_slots(0) == 3 and bm.num_allocated_blocks == 1
    _check_consistent(bm)


def test_append_across_block_boundaries():
    bm = BlockManager(8, 4)
    first = list(bm.allocate(0, 3))  # allocate returns the live table
    assert len(first) == 1
    # Slot 4 of 4 in the first block: no new block.
    assert bm.blocks_to_append(0, 1) == 0
    assert bm.append_slots(0, 1) == []
    assert bm.num_slots(0) == 4 and bm.block_table(0) == first
    # Token 5 starts a new block.
    assert bm.blocks_to_append(0, 1) == 1
    new = bm.append_slots(0, 1)
    assert len(new) == 1 and bm.block_table(0) == first + new
    # 5 + 8 = 13 slots -> 4 blocks, i.e. 2 more.
    assert bm.blocks_to_append(0, 8) == 2
    more = bm.append_slots(0, 8)
    assert len(more) == 2 and bm.block_table(0) == first + new + more
    assert bm.num_slots(0) == 13 and bm.num_stored_tokens() == 13
    # The table grows in place: earlier block ids never change.
    assert bm.block_table(0)[:2] == first + new
    _check_consistent(bm)


def test_block_size_one():
    bm = BlockManager(5, 1)
    bm.allocate(0, 2)
    bm.append_slots(0, 1)
    assert len(bm.block_table(0)) == 3 and bm.num_free_blocks == 2
    _check_consistent(bm)


def test_blocks_to_append_unknown_sequence_counts_from_zero():
    bm = BlockManager(8, 4)
    assert bm.blocks_to_append(99, 0) == 0
    assert bm.blocks_to_append(99, 1) == 1
    assert bm.blocks_to_append(99, 9) == 3


def test_blocks_to_append_does_not_change_state():
    bm = BlockManager(8, 4)
    bm.allocate(0, 5)
    before = (list(bm.pool.free), bm.block_table(0)[:], bm.num_slots(0))
    for n in range(0, 20):
        bm.blocks_to_append(0, n)
        bm.blocks_to_allocate(n)
    assert before == (list(bm.pool.free), bm.block_table(0), bm.num_slots(0))


def test_two_sequences_get_disjoint_blocks():
    bm = BlockManager(6, 2)
    a = list(bm.allocate(0, 3))
    b = list(bm.allocate(1, 4))
    bm.append_slots(0, 2)
    bm.append_slots(1, 1)
    assert not set(bm.block_table(0)) & set(bm.block_table(1))
    assert len(a) + len(b) == 4
    _check_consistent(bm)


# -- blocks_to_allocate and the watermark ---------------------------------------
# The scheduler admits a plan when its blocks plus a reserve (the watermark) are free.

def test_blocks_to_allocate_without_watermark():
    bm = BlockManager(4, 4)
    assert bm.blocks_to_allocate(16) <= bm.num_free_blocks
    assert bm.blocks_to_allocate(17) > bm.num_free_blocks
    assert 2 * bm.blocks_to_allocate(8) <= bm.num_free_blocks
    assert 2 * bm.blocks_to_allocate(9) > bm.num_free_blocks
    bm.allocate(0, 5)  # 2 blocks
    assert bm.blocks_to_allocate(8) <= bm.num_free_blocks < bm.blocks_to_allocate(9)


def test_blocks_to_allocate_keeps_watermark_free():
    bm = BlockManager(10, 4, watermark_blocks=2)
    reserve = bm.watermark_blocks
    assert bm.blocks_to_allocate(32) + reserve <= bm.num_free_blocks  # leaves exactly the 2
    assert bm.blocks_to_allocate(33) + reserve > bm.num_free_blocks  # would dip into them
    assert 2 * bm.blocks_to_allocate(16) + reserve <= bm.num_free_blocks
    assert 2 * bm.blocks_to_allocate(17) + reserve > bm.num_free_blocks
    bm.allocate(0, 28)  # 7 blocks, 3 free
    assert bm.blocks_to_allocate(4) + reserve <= bm.num_free_blocks
    assert bm.blocks_to_allocate(5) + reserve > bm.num_free_blocks


def test_fitting_above_the_watermark_means_allocate_succeeds():
    for watermark in range(3):
        bm = BlockManager(6, 2, watermark_blocks=watermark)
        bm.allocate(0, 3)  # 2 blocks taken, 4 free
        for n in range(0, 12):
            expected = 4 - cdiv(n, 2) >= watermark
            fits = bm.blocks_to_allocate(n) + bm.watermark_blocks <= bm.num_free_blocks
            assert fits == expected, (watermark, n)
            if expected:
                bm.allocate(1, n)
                bm.free(1)
        assert bm.num_free_blocks == 4


# -- blocks_to_append / append_slots when the pool runs out -----------------------

def test_blocks_to_append_and_exhaustion():
    bm = BlockManager(3, 4)
    bm.allocate(0, 4)  # 1 block
    bm.allocate(1, 4)  # 1 block, 1 free left
    assert bm.blocks_to_append(0, 4) <= bm.num_free_blocks  # exactly one more block
    assert bm.blocks_to_append(0, 5) > bm.num_free_blocks  # two more blocks
    bm.append_slots(0, 4)
    assert bm.num_free_blocks == 0
    # Appends that fit in already-owned slots need no block.
    assert bm.blocks_to_append(1, 1) > bm.num_free_blocks
    snapshot = (list(bm.pool.free), {s: t[:] for s, t in bm._tables.items()}, dict(bm._num_slots))
    with pytest.raises(RuntimeError):
        bm.append_slots(1, 1)
    # A refused append changes nothing.
    assert snapshot == (list(bm.pool.free), bm._tables, bm._num_slots)
    assert bm.num_slots(1) == 4 and bm.num_stored_tokens() == 12
    _check_consistent(bm)


def test_append_slots_fills_partial_block_on_full_pool():
    bm = BlockManager(1, 4)
    bm.allocate(0, 1)
    assert bm.num_free_blocks == 0
    assert bm.blocks_to_append(0, 3) <= bm.num_free_blocks
    assert bm.append_slots(0, 3) == []
    assert bm.blocks_to_append(0, 1) > bm.num_free_blocks
    with pytest.raises(RuntimeError):
        bm.append_slots(0, 1)
    _check_consistent(bm)


def test_failed_allocate_leaves_no_trace():
    """An allocation the pool cannot hold must not register the sequence or take blocks."""
    bm = BlockManager(2, 4)
    with pytest.raises(RuntimeError):
        bm.allocate(0, 9)  # 3 blocks
    assert bm.num_free_blocks == 2 and bm.num_stored_tokens() == 0
    assert not bm.has(0), "a refused allocate left an (empty) block table behind"
    bm.allocate(0, 8)  # the same id can be allocated once the pool allows it
    _check_consistent(bm)


def test_append_slots_unknown_sequence_does_not_leak_blocks():
    """append_slots on a sequence that was never allocated must fail without taking blocks."""
    bm = BlockManager(4, 4)
    with pytest.raises(KeyError):
        bm.append_slots(5, 6)
    assert bm.num_free_blocks == 4, "blocks were taken from the pool by a failed append_slots"
    assert all(bm.ref_count(b) == 0 for b in range(4))
    _check_consistent(bm)


# -- free / ref counts ---------------------------------------------------------------

def test_free_returns_every_block():
    bm = BlockManager(8, 4)
    table = list(bm.allocate(0, 10))
    bm.allocate(1, 3)
    bm.free(0)
    assert not bm.has(0) and bm.num_slots(0) == 0
    assert bm.num_free_blocks == 7 and bm.num_stored_tokens() == 3
    assert all(bm.ref_count(b) == 0 for b in table)
    assert set(table) <= set(bm.pool.free)
    with pytest.raises(KeyError):
        bm.block_table(0)
    _check_consistent(bm)
    bm.free(1)
    assert bm.num_free_blocks == 8 and bm.num_stored_tokens() == 0
    _check_consistent(bm)


def test_free_unknown_or_twice_is_noop():
    bm = BlockManager(4, 4)
    bm.allocate(0, 5)
    bm.free(123)
    assert bm.num_free_blocks == 2 and bm.num_slots(0) == 5
    bm.free(0)
    bm.free(0)
    assert bm.num_free_blocks == 4 and bm.num_stored_tokens() == 0
    assert sorted(bm.pool.free) == [0, 1, 2, 3]
    _check_consistent(bm)


def test_freed_blocks_are_reused():
    bm = BlockManager(2, 4)
    first = list(bm.allocate(0, 8))
    assert bm.blocks_to_allocate(1) > bm.num_free_blocks
    bm.free(0)
    assert bm.blocks_to_allocate(8) <= bm.num_free_blocks
    second = bm.allocate(1, 8)
    assert sorted(second) == sorted(first)
    assert all(bm.ref_count(b) == 1 for b in second)
    _check_consistent(bm)


def test_reallocate_after_free_starts_from_zero():
    bm = BlockManager(4, 4)
    bm.allocate(0, 7)
    bm.free(0)
    bm.allocate(0, 1)
    assert bm.num_slots(0) == 1 and len(bm.block_table(0)) == 1
    assert bm.num_stored_tokens() == 1
    _check_consistent(bm)


def test_shared_block_returns_with_last_user():
    """The ref-count path used by forked sequences: a shared block is freed only once."""
    bm = BlockManager(4, 4)
    table = list(bm.allocate(0, 4))
    shared = table[0]
    bm.fork(0, 1)
    assert bm.ref_count(shared) == 2 and bm.num_free_blocks == 3
    bm.free(0)
    assert bm.ref_count(shared) == 1 and shared not in bm.pool.free
    assert bm.num_free_blocks == 3
    bm.free(1)
    assert bm.ref_count(shared) == 0 and list(bm.pool.free).count(shared) == 1
    assert bm.num_free_blocks == 4 and bm.num_stored_tokens() == 0


def test_num_stored_tokens_tracks_slots():
    bm = BlockManager(16, 8)
    bm.allocate(0, 3)
    bm.allocate(1, 17)
    bm.append_slots(0, 6)
    bm.append_slots(1, 0)
    assert bm.num_stored_tokens() == 26
    bm.free(1)
    assert bm.num_stored_tokens() == 9
    bm.append_slots(0, 1)
    assert bm.num_stored_tokens() == 10
