"""BlockManager sharing property test: prefix hits, fork, copy-on-write and swap keep
every invariant.
"""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pagedserve.math_utils import cdiv
from pagedserve.scheduler.block_manager import BlockManager, block_key

# -- sharing: prefix caching, fork, copy-on-write and swapping ----------------------------

# Prompts share long prefixes often: a base sequence cut anywhere, then a short random tail.
_BASES = ([0] * 40, [0, 1, 2] * 14, [1, 1, 2, 0, 2, 2, 1, 0] * 5, [2, 1] * 20)
_tokens = st.lists(st.integers(0, 2), max_size=6)
_prompts = st.builds(lambda base, cut, tail: base[:cut] + tail,
                     st.sampled_from(_BASES), st.integers(0, 34), _tokens)


@functools.lru_cache(maxsize=100_000)
def _chain_key(extra_key, prefix: tuple, block_size: int):
    """The key of the full block ending `prefix` (len a multiple of block_size), chained."""
    parent = (None if len(prefix) == block_size
              else _chain_key(extra_key, prefix[:-block_size], block_size))
    return block_key(parent, prefix[-block_size:], extra_key)


class SharingMachine(RuleBasedStateMachine):
    """Prefix hits, forks, copy-on-write and swaps against a model of every sequence's tokens.

    The model: each sequence's tokens (its slots cover a prefix of them), its extra key,
    its group (a sequence and its forks, swapped together), and for each physical block
    the tokens it was last seen holding (every token before its end, since its K/V
    depend on the whole prefix).
    """

    def __init__(self) -> None:
        super().__init__()
        self.bm: BlockManager | None = None
        self.tokens: dict[int, list[int]] = {}  # every live sequence, on GPU or swapped
        self.slots: dict[int, int] = {}
        self.extra: dict[int, str | None] = {}
        self.groups: dict[int, set[int]] = {}  # group id -> its live sequences
        self.group_of: dict[int, int] = {}
        self.swapped: set[int] = set()  # swapped group ids
        self.content: dict[int, tuple] = {}  # GPU block -> (extra key, prefix it holds)
        self.history: list[list[int]] = []
        self.next_id = 0
        self.queries = self.hits = 0

    @initialize(num_blocks=st.integers(1, 40), block_size=st.sampled_from([1, 2, 4]),
                num_cpu_blocks=st.integers(0, 16), caching=st.booleans())
    def init_pool(self, num_blocks, block_size, num_cpu_blocks, caching):
        self.bm = BlockManager(num_blocks, block_size, num_cpu_blocks=num_cpu_blocks,
                               enable_prefix_caching=caching)

    # -- model helpers ---------------------------------------------------------------------
    def _view(self, seq_id: int, index: int) -> tuple:
        """What block `index` of the sequence holds: its extra key and every token up to its end."""
        end = min((index + 1) * self.bm.block_size, self.slots[seq_id])
        return self.extra[seq_id], tuple(self.tokens[seq_id][:end])

    def _key(self, view: tuple):
        extra_key, prefix = view
        return _chain_key(extra_key, prefix, self.bm.block_size)

    def _on_gpu(self) -> list[int]:
        return sorted(s for s in self.tokens if self.group_of[s] not in self.swapped)

    def _cpu_tables(self) -> dict[int, list[int]]:
        return self.bm._cpu.tables

    def _assert_keys_cached(self, seq_id: int, start: int = 0) -> None:
        """Full blocks just written (or swapped in) can be found: their keys are cached."""
        if self.bm.enable_prefix_caching:
            cached = {self.bm.cached_key(b) for b in range(self.bm.num_blocks)}
            assert set(self.bm._seq_keys[seq_id][start:]) <= cached

    def _new_seq(self, tokens, slots, extra_key, group) -> int:
        seq_id = self.next_id
        self.next_id += 1
        self.tokens[seq_id], self.slots[seq_id], self.extra[seq_id] = list(tokens), slots, extra_key
        self.groups.setdefault(group, set()).add(seq_id)
        self.group_of[seq_id] = group
        return seq_id

    # -- rules -----------------------------------------------------------------------------
    @rule(data=st.data(), prompt=_prompts, reuse=st.booleans(),
          extra_key=st.sampled_from([None, "a"]), chunk=st.integers(0, 48),
          use_hits=st.sampled_from([True, True, True, False]))
    def allocate(self, data, prompt, reuse, extra_key, chunk, use_hits):
        bm, bs = self.bm, self.bm.block_size
        if reuse and self.history:
            prompt = list(data.draw(st.sampled_from(self.history)))
        computed = bm.computed_blocks(prompt, extra_key)
        # The longest chain of cached keys, from the blocks' keys alone.
        by_key = {bm.cached_key(b): b for b in range(bm.num_blocks) if bm.cached_key(b) is not None}
        expected = []
        if bm.enable_prefix_caching:
            for end in range(bs, len(prompt), bs):
                block = by_key.get(self._key((extra_key, tuple(prompt[:end]))))
                if block is None:
                    break
                expected.append(block)
        assert computed == expected
        for index, block in enumerate(computed):  # a hit holds exactly this prefix
            assert self.content[block] == (extra_key, tuple(prompt[:(index + 1) * bs]))
        if not use_hits:
            computed = []
        start = len(computed) * bs
        num_tokens = min(len(prompt), start + chunk)
        needed = bm.blocks_to_allocate(num_tokens, computed)
        assert needed == (sum(bm.ref_count(b) == 0 for b in computed)
                          + cdiv(num_tokens, bs) - len(computed))
        free = bm.num_free_blocks
        if needed > free:
            with pytest.raises(RuntimeError):
                bm.allocate(self.next_id, num_tokens, prompt, computed, extra_key)
            assert bm.num_free_blocks == free and not bm.has(self.next_id)
            return
        seq_id = self._new_seq(prompt, num_tokens, extra_key, group=self.next_id)
        table = bm.allocate(seq_id, num_tokens, prompt, computed, extra_key)
        assert table[:len(computed)] == computed and len(table) == cdiv(num_tokens, bs)
        assert bm.num_free_blocks == free - needed
        if bm.enable_prefix_caching:
            self.queries += len(prompt)
            self.hits += start
        assert (bm.prefix_query_tokens, bm.prefix_hit_tokens) == (self.queries, self.hits)
        self._assert_keys_cached(seq_id)
        self.history.append(prompt)

    @precondition(lambda self: self.bm is not None and self._on_gpu())
    @rule(data=st.data(), new_tokens=_tokens, reserve=st.integers(0, 10), shared=st.booleans())
    def append(self, data, new_tokens, reserve, shared):
        bm, bs = self.bm, self.bm.block_size
        candidates = self._on_gpu()
        if shared:  # prefer a sequence whose partial last block others hold too
            candidates = [s for s in candidates if self.slots[s] % bs
                          and bm.ref_count(bm.block_table(s)[-1]) > 1] or candidates
        seq_id = data.draw(st.sampled_from(candidates))
        self.tokens[seq_id].extend(new_tokens)
        slots = self.slots[seq_id]
        n = min(reserve, len(self.tokens[seq_id]) - slots)
        table = list(bm.block_table(seq_id))
        cow = n > 0 and slots % bs != 0 and bm.ref_count(table[-1]) > 1
        assert bm.needs_copy_on_write(seq_id, n) == cow
        needed = cdiv(slots + n, bs) - len(table) + cow
        assert bm.blocks_to_append(seq_id, n) == needed
        free = bm.num_free_blocks
        if needed > free:
            return
        if cow:
            with pytest.raises(RuntimeError):
                bm.append_slots(seq_id, n, self.tokens[seq_id])
            assert bm.block_table(seq_id) == table and bm.num_slots(seq_id) == slots
            src_refs = bm.ref_count(table[-1])
            src, dst = bm.copy_on_write(seq_id)
            assert src == table[-1] and bm.block_table(seq_id) == table[:-1] + [dst]
            assert dst not in table and bm.ref_count(src) == src_refs - 1 and bm.ref_count(dst) == 1
            self.content[dst] = self.content[src]  # the worker copies the block
        known = len(bm._seq_keys[seq_id])
        new = bm.append_slots(seq_id, n, self.tokens[seq_id])
        self.slots[seq_id] = slots + n
        self._assert_keys_cached(seq_id, known)
        assert len(new) == cdiv(slots + n, bs) - len(table)
        assert bm.block_table(seq_id)[len(table):] == new
        assert bm.num_free_blocks == free - needed

    @precondition(lambda self: self.bm is not None and self._on_gpu())
    @rule(data=st.data())
    def fork(self, data):
        bm = self.bm
        parent = data.draw(st.sampled_from(self._on_gpu()))
        table = list(bm.block_table(parent))
        refs = [bm.ref_count(b) for b in table]
        free = bm.num_free_blocks
        child = self._new_seq(self.tokens[parent], self.slots[parent], self.extra[parent],
                              group=self.group_of[parent])
        bm.fork(parent, child)
        assert bm.block_table(child) == table and bm.num_slots(child) == self.slots[parent]
        for block, before in zip(table, refs, strict=True):
            assert bm.ref_count(block) == before + table.count(block)
        assert bm.num_free_blocks == free

    @precondition(lambda self: self.bm is not None and self.tokens)
    @rule(data=st.data())
    def free(self, data):
        bm = self.bm
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        free, cpu_free = bm.num_free_blocks, bm.num_cpu_blocks - bm.num_swapped_blocks
        if bm.is_swapped(seq_id):
            table = self._cpu_tables()[seq_id]
            released = sum(1 for c in set(table) if bm._cpu.ref_counts[c] == 1)
            bm.free(seq_id)
            assert bm.num_cpu_blocks - bm.num_swapped_blocks == cpu_free + released
            assert bm.num_free_blocks == free
        else:
            released = sum(1 for b in set(bm.block_table(seq_id)) if bm.ref_count(b) == 1)
            bm.free(seq_id)
            assert bm.num_free_blocks == free + released
            assert bm.num_cpu_blocks - bm.num_swapped_blocks == cpu_free
        assert not bm.has(seq_id) and not bm.is_swapped(seq_id) and bm.num_slots(seq_id) == 0
        group = self.group_of.pop(seq_id)
        self.groups[group].discard(seq_id)
        if not self.groups[group]:
            del self.groups[group]
            self.swapped.discard(group)
        del self.tokens[seq_id], self.slots[seq_id], self.extra[seq_id]

    @precondition(lambda self: self.bm is not None and set(self.groups) - self.swapped)
    @rule(data=st.data())
    def swap_out(self, data):
        bm = self.bm
        group = data.draw(st.sampled_from(sorted(set(self.groups) - self.swapped)))
        seq_ids = sorted(self.groups[group])
        tables = {s: list(bm.block_table(s)) for s in seq_ids}
        distinct = {b for t in tables.values() for b in t}
        cpu_free = bm.num_cpu_blocks - bm.num_swapped_blocks
        assert bm.can_swap_out(seq_ids) == (len(distinct) <= cpu_free)
        if len(distinct) > cpu_free:
            return
        held_elsewhere = {b for s, t in bm._tables.items() if s not in tables for b in t}
        free = bm.num_free_blocks
        pairs = bm.swap_out(seq_ids)
        mapping = dict(pairs)
        assert len(pairs) == len(distinct) and set(mapping) == distinct  # each block once
        assert len(set(mapping.values())) == len(pairs)
        assert bm.num_swapped_blocks == bm.num_cpu_blocks - cpu_free + len(pairs)
        assert bm.num_free_blocks == free + len(distinct - held_elsewhere)
        for seq_id, table in tables.items():
            assert bm.is_swapped(seq_id) and not bm.has(seq_id)
            assert self._cpu_tables()[seq_id] == [mapping[b] for b in table]
        self.swapped.add(group)

    @precondition(lambda self: self.bm is not None and self.swapped)
    @rule(data=st.data())
    def swap_in(self, data):
        bm = self.bm
        group = data.draw(st.sampled_from(sorted(self.swapped)))
        seq_ids = sorted(self.groups[group])
        cpu = {s: list(self._cpu_tables()[s]) for s in seq_ids}
        distinct = {c for t in cpu.values() for c in t}
        assert bm.blocks_to_swap_in(seq_ids) == len(distinct)
        free = bm.num_free_blocks
        if len(distinct) > free:
            with pytest.raises(RuntimeError):
                bm.swap_in(seq_ids)
            assert all(bm.is_swapped(s) for s in seq_ids) and bm.num_free_blocks == free
            return
        pairs = bm.swap_in(seq_ids)
        mapping = dict(pairs)
        assert len(pairs) == len(distinct) and set(mapping) == distinct
        assert len(set(mapping.values())) == len(pairs)
        assert bm.num_free_blocks == free - len(distinct)
        for seq_id in seq_ids:
            assert bm.has(seq_id) and not bm.is_swapped(seq_id)
            assert bm.block_table(seq_id) == [mapping[c] for c in cpu[seq_id]]
            self._assert_keys_cached(seq_id)  # cached again, here or on an older copy
        self.swapped.discard(group)

    # -- invariants --------------------------------------------------------------------------
    @invariant()
    def consistent(self):
        bm = self.bm
        if bm is None:
            return
        bs = bm.block_size
        on_gpu = self._on_gpu()
        off_gpu = sorted(set(self.tokens) - set(on_gpu))
        assert all(bm.has(s) and not bm.is_swapped(s) for s in on_gpu)
        assert all(bm.is_swapped(s) and not bm.has(s) for s in off_gpu)
        assert set(bm._tables) == set(on_gpu)
        # GPU: ref counts are the table entries; free and held partition the pool.
        views: dict[int, tuple] = {}
        fills: dict[int, int] = {}
        entries = [0] * bm.num_blocks
        for seq_id in on_gpu:
            table = bm.block_table(seq_id)
            assert bm.num_slots(seq_id) == self.slots[seq_id] <= len(self.tokens[seq_id])
            assert len(table) == cdiv(self.slots[seq_id], bs)
            assert len(set(table)) == len(table)
            for index, block in enumerate(table):
                entries[block] += 1
                fill = min(bs, self.slots[seq_id] - index * bs)
                assert fills.setdefault(block, fill) == fill, f"block {block}: two fills"
                view = self._view(seq_id, index)
                # Every holder agrees on what the block holds (same position, same prefix).
                assert views.setdefault(block, view) == view, f"block {block}: two contents"
        assert [bm.ref_count(b) for b in range(bm.num_blocks)] == entries
        free = list(bm.pool.free)
        assert len(set(free)) == len(free) == bm.num_free_blocks
        assert set(free) == {b for b in range(bm.num_blocks) if entries[b] == 0}
        assert bm.num_free_blocks + bm.num_allocated_blocks == bm.num_blocks
        assert bm.num_allocated_blocks == len(views)
        assert bm.num_logical_blocks == sum(entries)
        # The free queue: plain blocks first, cached ones behind them.
        is_cached = [bm.cached_key(b) is not None for b in free]
        assert is_cached == sorted(is_cached)
        assert bm.num_cached_blocks == sum(is_cached)
        self.content.update(views)
        # Every cached block's key is the key of what it holds; keys are unique.
        keys = [bm.cached_key(b) for b in range(bm.num_blocks)]
        live_keys = [k for k in keys if k is not None]
        assert len(live_keys) == len(set(live_keys))
        if not bm.enable_prefix_caching:
            assert not live_keys
        for block, key in enumerate(keys):
            if key is not None:
                prefix = self.content[block][1]
                assert len(prefix) % bs == 0 and prefix
                assert key == self._key(self.content[block])
        # Every sequence's full-block keys chain from block 0 over its tokens.
        for seq_id in self.tokens:
            seq_keys = bm._seq_keys[seq_id]
            full = min(self.slots[seq_id], len(self.tokens[seq_id])) // bs
            if bm.enable_prefix_caching:
                assert len(seq_keys) == full
            for index, key in enumerate(seq_keys):
                assert key == self._key(self._view(seq_id, index))
        # CPU: ref counts are the swapped table entries; free and used partition the pool.
        cpu_entries = [0] * bm.num_cpu_blocks
        cpu_views: dict[int, tuple] = {}
        assert set(self._cpu_tables()) == set(off_gpu)
        for seq_id in off_gpu:
            table = self._cpu_tables()[seq_id]
            assert bm.num_slots(seq_id) == self.slots[seq_id]
            assert len(table) == cdiv(self.slots[seq_id], bs) and len(set(table)) == len(table)
            for index, cpu_id in enumerate(table):
                cpu_entries[cpu_id] += 1
                view = self._view(seq_id, index)
                assert cpu_views.setdefault(cpu_id, view) == view
        assert bm._cpu.ref_counts == cpu_entries
        cpu_free = list(bm._cpu.free)
        assert len(set(cpu_free)) == len(cpu_free)
        assert set(cpu_free) == {c for c in range(bm.num_cpu_blocks) if cpu_entries[c] == 0}
        assert bm.num_swapped_blocks == len(cpu_views)
        assert len(cpu_free) + bm.num_swapped_blocks == bm.num_cpu_blocks
        # Stored tokens: each allocated physical block's filled slots, once.
        assert bm.num_stored_tokens() == sum(fills.values())
        assert bm.num_stored_tokens() <= bm.num_allocated_blocks * bs

    def teardown(self):
        bm = self.bm
        if bm is None:
            return
        for seq_id in list(self.tokens):
            bm.free(seq_id)
        assert bm.num_free_blocks == bm.num_blocks and bm.num_allocated_blocks == 0
        assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))
        assert sorted(bm.pool.free) == list(range(bm.num_blocks))
        assert bm.num_cached_blocks == sum(bm.cached_key(b) is not None
                                           for b in range(bm.num_blocks))
        assert bm.num_logical_blocks == 0 and bm.num_stored_tokens() == 0
        assert bm.num_swapped_blocks == 0 and sorted(bm._cpu.free) == list(range(bm.num_cpu_blocks))
        assert not any(bm._cpu.ref_counts)


SharingMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSharingMachine = SharingMachine.TestCase
