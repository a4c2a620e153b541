"""Sliding windows in the BlockManager: blocks wholly before every layer's window are
released and become table holes, through forks, swaps, frees and the prefix cache."""

from __future__ import annotations

from pagedserve.scheduler.block_manager import HOLE, BlockManager

BS = 4


def _held(bm: BlockManager) -> int:
    return bm.num_blocks - bm.num_free_blocks


def test_a_long_sequence_holds_about_its_window():
    bm = BlockManager(64, BS, sliding_window=6)
    bm.allocate(1, 30)  # positions 0..29: 8 blocks
    # The next token (position 30) sees 25..30: blocks 0..5 (positions 0..23) are out.
    assert bm.release_before_window(1, 30) == 6
    table = bm.block_table(1)
    assert table[:6] == [HOLE] * 6 and bm.num_holes(1) == 6
    assert _held(bm) == 2 and bm.num_logical_blocks == 2
    assert bm.release_before_window(1, 30) == 0  # nothing more until it moves on
    bm.append_slots(1, 20)  # to 50 tokens
    assert bm.release_before_window(1, 50) == 5  # (50 - 6 + 1) // 4 = 11 holes now
    assert bm.num_holes(1) == 11 and _held(bm) == 13 - 11
    bm.free(1)
    assert _held(bm) == 0 and bm.num_free_blocks == 64


def test_the_last_block_always_stays():
    bm = BlockManager(8, BS, sliding_window=1)
    bm.allocate(1, 8)  # two full blocks; the next token lands in a new one
    assert bm.release_before_window(1, 8) == 1  # block 1 (positions 4..7) stays: the last
    assert bm.num_holes(1) == 1 and _held(bm) == 1


def test_no_window_releases_nothing():
    bm = BlockManager(16, BS)
    bm.allocate(1, 40 // 10)
    assert bm.release_before_window(1, 1000) == 0


def test_a_fork_shares_the_held_blocks_and_the_holes():
    bm = BlockManager(32, BS, sliding_window=5)
    bm.allocate(1, 21)
    bm.release_before_window(1, 21)  # (21 - 5 + 1) // 4 = 4 holes; blocks 4, 5 held
    bm.fork(1, 2)
    assert bm.block_table(2) == bm.block_table(1) and bm.num_holes(2) == 4
    assert [bm.ref_count(b) for b in bm.block_table(1)[4:]] == [2, 2]
    bm.free(1)
    assert [bm.ref_count(b) for b in bm.block_table(2)[4:]] == [1, 1] and _held(bm) == 2
    bm.free(2)
    assert _held(bm) == 0


def test_a_swap_moves_only_the_held_blocks_and_keeps_the_holes():
    bm = BlockManager(32, BS, num_cpu_blocks=8, sliding_window=5)
    bm.allocate(1, 21)
    bm.release_before_window(1, 21)
    pairs = bm.swap_out([1])
    assert len(pairs) == 2 and bm.num_swapped_blocks == 2 and _held(bm) == 0
    back = bm.swap_in([1])
    assert len(back) == 2 and bm.num_holes(1) == 4
    table = bm.block_table(1)
    assert table[:4] == [HOLE] * 4 and sorted(table[4:]) == sorted(b for _, b in back)
    bm.free(1)
    assert _held(bm) == 0 and bm.num_swapped_blocks == 0


def test_released_full_blocks_stay_cached_for_other_requests():
    bm = BlockManager(32, BS, enable_prefix_caching=True, sliding_window=5)
    tokens = list(range(100, 121))  # 21 tokens: 5 full blocks
    bm.allocate(1, 21, tokens)
    bm.release_before_window(1, 21)
    assert bm.num_cached_blocks == 4  # released, free, and still keyed
    hits = bm.computed_blocks(tokens)
    assert len(hits) == 5  # the whole prefix: 4 released blocks and the held one
    bm.allocate(2, 21, tokens, hits)
    assert bm.num_cached_blocks == 0 and bm.prefix_hit_tokens == 20
    bm.free(1)
    bm.free(2)
    assert _held(bm) == 0
