"""AdapterSlots (scheduler/adapter_slots.py): random acquire / release / forget against a model."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pagedserve.scheduler.adapter_slots import AdapterSlots

IDS = st.integers(1, 7)


class SlotsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.slots: AdapterSlots | None = None
        self.users: dict[int, int] = {}  # model: running groups per adapter
        self.idle: list[int] = []  # model: resident, unused, least recently released first
        self.placed: dict[int, int] = {}  # what the loads reported: lora_id -> slot

    @initialize(max_loras=st.integers(1, 4))
    def start(self, max_loras: int) -> None:
        self.slots = AdapterSlots(max_loras)

    @rule(lora_id=IDS)
    def acquire(self, lora_id: int) -> None:
        resident = set(self.users) | set(self.idle)
        full = len(resident) == self.slots.max_loras
        expected_evict = self.idle[0] if lora_id not in resident and full and self.idle else None
        slot = self.slots.acquire(lora_id)
        if lora_id not in resident and full and not self.idle:
            assert slot is None  # every slot is used by running groups: wait
            return
        assert slot is not None
        if expected_evict is not None:  # the adapter idle the longest made room
            self.idle.remove(expected_evict)
            assert self.slots.slot(expected_evict) is None
            self.placed.pop(expected_evict, None)
        if lora_id in self.idle:
            self.idle.remove(lora_id)
        self.users[lora_id] = self.users.get(lora_id, 0) + 1
        for placed_slot, placed_id in self.slots.take_loads():
            self.placed[placed_id] = placed_slot
        assert self.placed[lora_id] == slot

    @precondition(lambda self: self.users)
    @rule(data=st.data())
    def release(self, data) -> None:
        lora_id = data.draw(st.sampled_from(sorted(self.users)))
        self.slots.release(lora_id)
        self.users[lora_id] -= 1
        if not self.users[lora_id]:
            del self.users[lora_id]
            self.idle.append(lora_id)

    @rule(lora_id=IDS)
    def forget(self, lora_id: int) -> None:
        dropped = self.slots.forget(lora_id)
        assert dropped == (lora_id not in self.users)
        if dropped and lora_id in self.idle:
            self.idle.remove(lora_id)
            self.placed.pop(lora_id, None)

    @invariant()
    def consistent(self) -> None:
        if self.slots is None:
            return
        resident = self.slots.resident()
        assert sorted(resident) == sorted(set(self.users) | set(self.idle))
        taken = [self.slots.slot(i) for i in resident]
        assert len(set(taken)) == len(taken) and all(0 <= s < self.slots.max_loras
                                                     for s in taken)
        for lora_id, count in self.users.items():
            assert self.slots.users(lora_id) == count  # in use: never evicted
        assert self.slots.can_acquire(99) == (len(resident) < self.slots.max_loras
                                              or bool(self.idle))


TestAdapterSlots = SlotsMachine.TestCase
TestAdapterSlots.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_misuse_is_refused():
    slots = AdapterSlots(2)
    with pytest.raises(ValueError, match="adapter ids are >= 1"):
        slots.acquire(0)
    with pytest.raises(ValueError, match="release without acquire"):
        slots.release(3)
    with pytest.raises(ValueError, match="at least one adapter slot"):
        AdapterSlots(0)


def test_a_waiting_adapter_gets_the_first_slot_freed_and_counts_evictions():
    slots = AdapterSlots(2)
    assert slots.acquire(1) == 0 and slots.acquire(2) == 1
    assert slots.acquire(3) is None  # both in use
    slots.release(2)
    assert slots.acquire(3) == 1 and slots.evictions == 1
    assert slots.take_loads() == [(0, 1), (1, 2), (1, 3)]
    slots.release(1)
    assert slots.acquire(1) == 0 and slots.take_loads() == []  # still resident: no reload
