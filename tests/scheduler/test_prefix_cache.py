"""Prefix caching in the BlockManager: hits, eviction order, keys, accounting (plain Python)."""

from __future__ import annotations

import pytest
from support.block_manager import cached, chain_keys, free_ids

from pagedserve.scheduler.block_manager import BlockManager, block_key

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


def test_a_hit_two_new_tables_share_leaves_the_free_queue_once():
    """Two samples of one request, recomputed together, reuse their cached prompt: the
    second counts only what the first has not claimed, as allocating both then takes."""
    bm = cached()
    prompt = list(range(8))  # two full blocks
    bm.allocate(0, 9, prompt + [100])
    bm.free(0)
    first, second = prompt + [100, 101, 102], prompt + [200, 201, 202]
    hits = bm.computed_blocks(first)
    assert hits == bm.computed_blocks(second) == [0, 1]
    assert bm.blocks_to_allocate(11, hits) == 3  # two from the free queue + one fresh
    assert bm.blocks_to_allocate(11, hits, claimed=set(hits)) == 1  # the fresh one alone
    before = bm.num_free_blocks
    bm.allocate(1, 11, first, hits)
    bm.allocate(2, 11, second, hits)
    assert before - bm.num_free_blocks == 3 + 1


def test_queries_do_not_evict_or_change_state():
    bm = cached(num_blocks=4, block_size=2)
    bm.allocate(0, 4, [1, 2, 3, 4])
    bm.free(0)
    before = (free_ids(bm), [bm.cached_key(b) for b in range(4)])
    for n in range(10):
        bm.computed_blocks([1, 2, 3, 4, 5][:n])
        bm.blocks_to_allocate(n, [0])
        bm.blocks_to_allocate(n)
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
