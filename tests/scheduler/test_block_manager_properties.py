"""BlockManager property test: random operation sequences keep every invariant."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)
from test_block_manager import _check_consistent

from pagedserve.math_utils import cdiv
from pagedserve.scheduler.block_manager import BlockManager

# -- property test over random operation sequences -------------------------------------

class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / append_slots / free against a model of slot counts."""

    seqs = Bundle("seqs")

    def __init__(self) -> None:
        super().__init__()
        self.bm: BlockManager | None = None
        self.slots: dict[int, int] = {}  # model: seq id -> slots it owns
        self.next_id = 0

    @initialize(num_blocks=st.integers(1, 32), block_size=st.sampled_from([1, 2, 4, 8, 16]),
                watermark=st.integers(0, 3))
    def init_pool(self, num_blocks, block_size, watermark):
        self.bm = BlockManager(num_blocks, block_size, watermark_blocks=watermark)

    def _model_blocks(self, slots: int) -> int:
        return cdiv(slots, self.bm.block_size)

    @rule(target=seqs, num_tokens=st.integers(0, 80))
    def allocate(self, num_tokens):
        seq_id = self.next_id
        self.next_id += 1
        needed = self._model_blocks(num_tokens)
        free = self.bm.num_free_blocks
        assert self.bm.blocks_to_allocate(num_tokens) == needed
        if needed <= free:
            table = self.bm.allocate(seq_id, num_tokens)
            assert len(table) == needed
            assert self.bm.num_free_blocks == free - needed
            self.slots[seq_id] = num_tokens
        else:
            with pytest.raises(RuntimeError):
                self.bm.allocate(seq_id, num_tokens)
            assert self.bm.num_free_blocks == free
            # Drop whatever a refused allocate left behind (see
            # test_failed_allocate_leaves_no_trace for that bug on its own).
            self.bm.free(seq_id)
        return seq_id

    @rule(seq_id=seqs, num_tokens=st.integers(0, 40))
    def append(self, seq_id, num_tokens):
        if seq_id not in self.slots:
            return
        before = self.slots[seq_id]
        needed = self._model_blocks(before + num_tokens) - self._model_blocks(before)
        assert self.bm.blocks_to_append(seq_id, num_tokens) == needed
        free = self.bm.num_free_blocks
        old_table = list(self.bm.block_table(seq_id))
        if needed <= free:
            new = self.bm.append_slots(seq_id, num_tokens)
            assert len(new) == needed
            assert self.bm.block_table(seq_id) == old_table + new
            self.slots[seq_id] = before + num_tokens
        else:
            with pytest.raises(RuntimeError):
                self.bm.append_slots(seq_id, num_tokens)
            assert self.bm.block_table(seq_id) == old_table
            assert self.bm.num_free_blocks == free

    @rule(seq_id=consumes(seqs))
    def free(self, seq_id):
        owned = len(self.bm.block_table(seq_id)) if self.bm.has(seq_id) else 0
        free = self.bm.num_free_blocks
        self.bm.free(seq_id)
        self.slots.pop(seq_id, None)
        assert not self.bm.has(seq_id)
        assert self.bm.num_free_blocks == free + owned

    @rule(seq_id=st.integers(1000, 1010))
    def free_unknown(self, seq_id):
        free = self.bm.num_free_blocks
        self.bm.free(seq_id)
        assert self.bm.num_free_blocks == free

    @rule()
    def free_everything(self):
        for seq_id in list(self.slots):
            self.bm.free(seq_id)
        self.slots.clear()
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert self.bm.num_stored_tokens() == 0
        assert all(self.bm.ref_count(b) == 0 for b in range(self.bm.num_blocks))

    @invariant()
    def consistent(self):
        if self.bm is None:
            return
        _check_consistent(self.bm)
        assert set(self.bm._tables) == set(self.slots)
        for seq_id, slots in self.slots.items():
            assert self.bm.num_slots(seq_id) == slots
            assert len(self.bm.block_table(seq_id)) == self._model_blocks(slots)
        assert self.bm.num_stored_tokens() == sum(self.slots.values())

    def teardown(self):
        if self.bm is None:
            return
        for seq_id in list(self.slots):
            self.bm.free(seq_id)
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert self.bm.num_stored_tokens() == 0
        assert sorted(self.bm.pool.free) == list(range(self.bm.num_blocks))


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBlockManagerMachine = BlockManagerMachine.TestCase
