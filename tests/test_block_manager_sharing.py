"""BlockManager sharing: prefix caching, fork + copy-on-write, and swapping (plain Python)."""

from __future__ import annotations

import pytest

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
    return list(bm._free)


# The CPU pool has no public per-block view: these read it directly.
def cpu_table(bm: BlockManager, seq_id: int) -> list[int]:
    return bm._cpu_tables[seq_id]


def cpu_ref(bm: BlockManager, cpu_id: int) -> int:
    return bm._cpu_ref_counts[cpu_id]


def num_free_cpu(bm: BlockManager) -> int:
    return bm.num_cpu_blocks - bm.num_swapped_blocks


def cached(num_blocks=16, block_size=4, **kwargs) -> BlockManager:
    return BlockManager(num_blocks, block_size, enable_prefix_caching=True, **kwargs)


# -- prefix cache: hits ---------------------------------------------------------------

def test_same_prompt_reuses_full_blocks():
    bm = cached()
    tokens = list(range(10))  # two full blocks + 2 tokens
    assert bm.allocate(0, 10, tokens) == [0, 1, 2]
    keys = chain_keys(tokens, 4)
    assert [bm.cached_key(b) for b in (0, 1, 2)] == [keys[0], keys[1], None]
    computed = bm.computed_blocks(tokens)
    assert computed == [0, 1]
    assert bm.blocks_to_allocate(10, computed) == 1  # both hits are held: one fresh block
    assert bm.allocate(1, 10, tokens, computed) == [0, 1, 3]
    assert [bm.ref_count(b) for b in range(4)] == [2, 2, 1, 1]
    assert bm.num_allocated_blocks == 4 and bm.num_logical_blocks == 6
    assert bm.num_free_blocks == 12
    assert bm.num_slots(1) == 10
    # Nothing is written twice: the third block is the second sequence's own.
    assert bm.cached_key(3) is None


def test_hit_with_chunked_allocation():
    """A hit chain plus a chunk shorter than the rest of the prompt."""
    bm = cached()
    tokens = list(range(13))
    bm.allocate(0, 13, tokens)
    computed = bm.computed_blocks(tokens)
    assert computed == [0, 1, 2]
    assert bm.allocate(1, 12 + 1, tokens, computed) == [0, 1, 2, 4]
    bm.free(1)
    with pytest.raises(ValueError):  # the hits hold more than num_tokens
        bm.allocate(2, 11, tokens, computed)
    assert not bm.has(2) and [bm.ref_count(b) for b in (0, 1, 2)] == [1, 1, 1]


@pytest.mark.parametrize("length, hits", [(1, 0), (4, 0), (5, 1), (7, 1), (8, 1), (9, 2), (12, 2),
                                          (13, 3)])
def test_last_token_is_never_covered(length, hits):
    bm = cached()
    tokens = list(range(100, 116))
    bm.allocate(0, 16, tokens)  # four cached blocks
    computed = bm.computed_blocks(tokens[:length])
    assert computed == [0, 1, 2, 3][:hits]
    assert len(computed) * 4 <= length - 1


def test_prompt_of_whole_blocks_reuses_all_but_the_last():
    bm = cached(block_size=2)
    tokens = [5, 6, 7, 8, 9, 10]
    bm.allocate(0, 6, tokens)
    assert all(bm.cached_key(b) is not None for b in bm.block_table(0))  # all three full
    assert bm.computed_blocks(tokens) == [0, 1]
    assert bm.computed_blocks([]) == [] and bm.computed_blocks([5]) == []


@pytest.mark.parametrize("position, hits", [(0, []), (3, []), (4, [0]), (7, [0]), (8, [0, 1]),
                                            (11, [0, 1]), (12, [0, 1, 2])])
def test_different_token_stops_the_chain(position, hits):
    bm = cached()
    tokens = list(range(13))
    bm.allocate(0, 13, tokens)
    other = list(tokens)
    other[position] = 99
    assert bm.computed_blocks(other) == hits


def test_same_block_at_another_position_is_another_key():
    bm = cached(block_size=2)
    bm.allocate(0, 5, [7, 7, 7, 7, 7])
    table = bm.block_table(0)
    assert bm.cached_key(table[0]) != bm.cached_key(table[1])
    assert bm.computed_blocks([7, 7, 9]) == [table[0]]
    assert bm.computed_blocks([7, 7, 7, 7, 9]) == table[:2]
    assert bm.computed_blocks([9, 9, 7, 7, 9]) == []


def test_extra_key_must_match():
    bm = cached()
    tokens = list(range(9))
    bm.allocate(0, 9, tokens, extra_key="adapter-a")
    assert bm.computed_blocks(tokens) == []
    assert bm.computed_blocks(tokens, "adapter-b") == []
    assert bm.computed_blocks(tokens, "adapter-a") == [0, 1]
    assert bm.cached_key(0) == chain_keys(tokens, 4, "adapter-a")[0] != chain_keys(tokens, 4)[0]
    bm.allocate(1, 9, tokens)  # no extra key: its own blocks, its own keys
    assert bm.computed_blocks(tokens) == bm.block_table(1)[:2] == [3, 4]
    assert bm.computed_blocks(tokens, "adapter-a") == [0, 1]


def test_blocks_stay_cached_after_free_and_a_hit_takes_them_back():
    bm = cached()
    tokens = list(range(9))
    bm.allocate(0, 9, tokens)  # [0, 1, 2]; 0 and 1 full
    bm.free(0)
    assert [bm.ref_count(b) for b in (0, 1, 2)] == [0, 0, 0]
    assert bm.num_free_blocks == 16 and bm.num_allocated_blocks == 0
    assert bm.num_cached_blocks == 2
    assert bm.cached_key(0) is not None and bm.cached_key(1) is not None
    computed = bm.computed_blocks(tokens)
    assert computed == [0, 1]
    assert bm.blocks_to_allocate(9, computed) == 3  # two taken back from the free queue + one
    table = bm.allocate(1, 9, tokens, computed)
    assert table[:2] == [0, 1] and bm.ref_count(0) == bm.ref_count(1) == 1
    assert bm.num_free_blocks == 13 and bm.num_allocated_blocks == 3
    assert bm.num_cached_blocks == 0  # held again: no longer evictable
    assert 0 not in free_ids(bm) and 1 not in free_ids(bm)
    # The hits are really out of the free queue: the rest of the pool never returns them.
    bm.allocate(2, 13 * 4)
    assert bm.num_free_blocks == 0
    assert not {0, 1} & set(bm.block_table(2))
    assert bm.ref_count(0) == bm.ref_count(1) == 1


def test_queries_do_not_evict_or_change_state():
    bm = cached(num_blocks=4, block_size=2)
    bm.allocate(0, 4, [1, 2, 3, 4])
    bm.free(0)
    before = (free_ids(bm), [bm.cached_key(b) for b in range(4)])
    for n in range(10):
        bm.computed_blocks([1, 2, 3, 4, 5][:n])
        bm.blocks_to_allocate(n, [0])
        bm.can_allocate(n)
    assert before == (free_ids(bm), [bm.cached_key(b) for b in range(4)])


# -- prefix cache: eviction -------------------------------------------------------------

def test_plain_free_blocks_go_before_cached_ones():
    bm = cached(num_blocks=4, block_size=2)
    assert bm.allocate(0, 4, [1, 2, 3, 4]) == [0, 1]
    k0, k1 = bm.cached_key(0), bm.cached_key(1)
    bm.free(0)
    assert free_ids(bm) == [2, 3, 1, 0]  # tail freed first: evicted first
    # Two fresh blocks: the plain ones, no eviction.
    assert bm.allocate(1, 4) == [2, 3]
    assert (bm.cached_key(0), bm.cached_key(1)) == (k0, k1) and bm.num_cached_blocks == 2
    assert bm.computed_blocks([1, 2, 3, 4, 5]) == [0, 1]
    # A third fresh block evicts the least recently freed cached block (the tail).
    assert bm.allocate(2, 1) == [1]
    assert bm.cached_key(1) is None and bm.cached_key(0) == k0 and bm.num_cached_blocks == 1
    assert bm.computed_blocks([1, 2, 3, 4, 5]) == [0]
    assert bm.allocate(3, 1) == [0]
    assert bm.cached_key(0) is None and bm.num_cached_blocks == 0
    assert bm.computed_blocks([1, 2, 3, 4, 5]) == []


def test_freed_plain_blocks_also_go_before_cached_ones():
    bm = cached(num_blocks=3, block_size=2)
    bm.allocate(0, 2, [1, 2])  # block 0, cached
    bm.allocate(1, 1)  # block 1, never cached
    bm.free(0)
    bm.free(1)
    assert free_ids(bm) == [1, 2, 0]
    assert bm.allocate(2, 4) == [1, 2]
    assert bm.cached_key(0) is not None


def test_cached_blocks_evicted_least_recently_freed_first():
    bm = cached(num_blocks=3, block_size=2)
    for seq_id, tokens in enumerate(([1, 1], [2, 2], [3, 3])):
        assert bm.allocate(seq_id, 2, tokens) == [seq_id]
    bm.free(0)
    bm.free(2)
    bm.free(1)
    assert free_ids(bm) == [0, 2, 1] and bm.num_cached_blocks == 3
    # A hit on the oldest one takes it out of the queue; the fresh block evicts the next oldest.
    computed = bm.computed_blocks([1, 1, 9])
    assert computed == [0]
    assert bm.allocate(3, 3, [1, 1, 9], computed) == [0, 2]
    assert bm.computed_blocks([3, 3, 9]) == [] and bm.computed_blocks([2, 2, 9]) == [1]
    bm.free(3)  # block 2 holds 1 token (plain, to the front), block 0 is freed most recently
    assert free_ids(bm) == [2, 1, 0]
    assert bm.allocate(4, 4) == [2, 1]
    assert bm.computed_blocks([2, 2, 9]) == [] and bm.computed_blocks([1, 1, 9]) == [0]


def test_freed_sequence_keeps_its_head_longest():
    bm = cached(num_blocks=3, block_size=2)
    bm.allocate(0, 6, [1, 2, 3, 4, 5, 6])
    bm.free(0)
    assert free_ids(bm) == [2, 1, 0]
    bm.allocate(1, 1)
    assert bm.computed_blocks([1, 2, 3, 4, 5, 6, 7]) == [0, 1]
    bm.allocate(2, 1)
    assert bm.computed_blocks([1, 2, 3, 4, 5, 6, 7]) == [0]


# -- prefix cache: accounting and switching it off ----------------------------------------

def test_hit_accounting():
    bm = cached()
    tokens = list(range(10))
    bm.allocate(0, 10, tokens)
    assert (bm.prefix_query_tokens, bm.prefix_hit_tokens) == (10, 0)
    bm.allocate(1, 10, tokens, bm.computed_blocks(tokens))
    assert (bm.prefix_query_tokens, bm.prefix_hit_tokens) == (20, 8)
    bm.allocate(2, 3)  # no token ids: not a query
    assert (bm.prefix_query_tokens, bm.prefix_hit_tokens) == (20, 8)
    bm.allocate(3, 5, tokens[:5], bm.computed_blocks(tokens[:5]))
    assert (bm.prefix_query_tokens, bm.prefix_hit_tokens) == (25, 12)


def test_disabled_prefix_caching_never_caches():
    bm = BlockManager(8, 2)
    tokens = [1, 2, 3, 4, 5]
    table = list(bm.allocate(0, 5, tokens))
    bm.append_slots(0, 1, tokens + [6])
    assert all(bm.cached_key(b) is None for b in range(8))
    assert bm.computed_blocks(tokens) == []
    bm.free(0)
    assert bm.num_cached_blocks == 0 and bm.computed_blocks(tokens) == []
    assert bm.allocate(1, 5, tokens, bm.computed_blocks(tokens)) == table  # plain reuse
    assert all(bm.cached_key(b) is None for b in range(8))
    assert all(bm.ref_count(b) <= 1 for b in range(8))
    assert (bm.prefix_query_tokens, bm.prefix_hit_tokens) == (0, 0)


def test_append_slots_caches_blocks_as_they_fill():
    bm = cached(block_size=2)
    tokens = [1, 2, 3]
    bm.allocate(0, 3, tokens)
    assert bm.cached_key(bm.block_table(0)[1]) is None
    tokens.append(4)
    bm.append_slots(0, 1, tokens)
    assert [bm.cached_key(b) for b in bm.block_table(0)] == chain_keys(tokens, 2)
    # Slots without their token ids register nothing; a later call catches up.
    bm.append_slots(0, 2)
    assert bm.cached_key(bm.block_table(0)[2]) is None
    bm.append_slots(0, 0, tokens + [5, 6])
    assert [bm.cached_key(b) for b in bm.block_table(0)] == chain_keys(tokens + [5, 6], 2)


def test_equal_blocks_from_two_sequences_are_cached_once():
    bm = cached(block_size=2)
    bm.allocate(0, 3, [1, 2, 3])
    bm.allocate(1, 3, [1, 2, 3])  # no hits used: its own copy of the same block
    assert bm.cached_key(bm.block_table(1)[0]) is None
    assert bm.computed_blocks([1, 2, 3]) == [bm.block_table(0)[0]]


# -- block keys ---------------------------------------------------------------------------

@pytest.mark.parametrize("a, b", [
    ([1, 23], [12, 3]),  # equal as concatenated digits
    ([256], [0, 1]),  # equal as little-endian bytes of 2-byte vs 1-byte tokens
    ([1, 0], [256]),
    ([0], [0, 0]),
    ([1, 2], [2, 1]),
    ([2**32], [0, 1]),
    ([-1], [2**63 - 1]),
])
def test_distinct_tokens_give_distinct_keys(a, b):
    assert block_key(None, a, None) != block_key(None, b, None)
    parent = block_key(None, [7], None)
    assert block_key(parent, a, None) != block_key(parent, b, None)


def test_block_key_is_deterministic_and_chained():
    k = block_key(None, [1, 2], None)
    assert k == block_key(None, [1, 2], None) and len(k) == 32
    assert block_key(k, [3, 4], None) != block_key(None, [3, 4], None)
    assert block_key(block_key(None, [3, 4], None), [1, 2], None) != block_key(k, [3, 4], None)
    assert block_key(block_key(None, [9, 9], None), [3, 4], None) != block_key(k, [3, 4], None)
    assert len({block_key(None, [1, 2], e) for e in (None, "", "a", "b", "ab")}) == 5


def test_naive_collisions_do_not_hit_in_the_manager():
    bm = cached(block_size=2)
    bm.allocate(0, 3, [1, 23, 5])
    assert bm.computed_blocks([12, 3, 5]) == []
    assert bm.computed_blocks([1, 23, 5]) == [bm.block_table(0)[0]]


# -- a stale hit list ------------------------------------------------------------------------

def test_stale_computed_list_is_not_silently_shared():
    """The scheduler plans a group's sequences (computed_blocks each), then allocates them."""
    bm = cached(num_blocks=4, block_size=2)
    for seq_id, tokens in ((10, [2, 2]), (11, [1, 1]), (12, [3, 3]), (13, [4, 4])):
        bm.allocate(seq_id, 2, tokens)
    for seq_id in (10, 11, 12, 13):
        bm.free(seq_id)
    x, y = [1, 1, 5], [2, 2, 5]
    cx, cy = bm.computed_blocks(x), bm.computed_blocks(y)
    assert (cx, cy) == ([1], [0])
    assert bm.blocks_to_allocate(3, cx) + bm.blocks_to_allocate(3, cy) <= bm.num_free_blocks
    bm.allocate(0, 3, x, cx)  # its fresh block evicts y's hit (block 0)
    with pytest.raises(ValueError, match="was evicted since computed_blocks"):
        bm.allocate(1, 3, y, cy)
    assert not bm.has(1) and bm.ref_count(0) == 1


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
    assert bm.can_append_slots(1, 3)
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
    assert bm.needs_copy_on_write(1, 1) and not bm.can_append_slots(1, 1)
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


def test_swap_in_leaves_keys_cached_elsewhere_alone():
    tokens = [1, 2, 3, 4, 5]
    keys = chain_keys(tokens, 2)
    bm = cached(num_blocks=6, block_size=2, num_cpu_blocks=6)
    bm.allocate(0, 5, tokens)
    bm.swap_out([0])
    assert free_ids(bm) == [2, 3, 4, 5, 1, 0]
    bm.swap_in([0])  # takes 2, 3, 4: the old cached copies stay
    table = bm.block_table(0)
    assert table == [2, 3, 4] and all(bm.cached_key(b) is None for b in table)
    assert (bm.cached_key(0), bm.cached_key(1)) == (keys[0], keys[1])
    assert bm.computed_blocks(tokens) == [0, 1]


def test_swap_in_recaches_only_the_evicted_key():
    tokens = [1, 2, 3, 4, 5]
    keys = chain_keys(tokens, 2)
    bm = cached(num_blocks=6, block_size=2, num_cpu_blocks=6)
    bm.allocate(0, 5, tokens)
    bm.swap_out([0])
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
