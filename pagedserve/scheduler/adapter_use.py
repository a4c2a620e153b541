"""The scheduler's LoRA bookkeeping: which requests use which adapter, and its slot.

A request under an adapter holds the adapter's device slot (adapter_slots.py)
from the step it starts running until it stops: finished, aborted or
preempted. Each step carries the slot loads decided while planning it, and
the adapters unloaded since the step before.

An adapter unloaded while requests still use it stays until the last of them
ends, then goes; new requests for it are the engine's to refuse.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from pagedserve.lora_request import AdapterSpec
from pagedserve.scheduler.adapter_slots import AdapterSlots
from pagedserve.scheduler.sequence import SequenceGroup
from pagedserve.scheduler.step import StepInput


class AdapterUse:
    def __init__(self, slots: AdapterSlots | None) -> None:
        self.slots = slots
        self._requests: Counter[int] = Counter()  # lora_id -> its unfinished requests
        self._closing: set[int] = set()  # unloaded, waiting for their requests to end
        self._unloads: list[int] = []  # unloaded since the last step
        self._specs: dict[int, AdapterSpec] = {}  # the adapters in slots
        self.on_unloaded: Callable[[int], None] | None = None  # told each adapter gone

    def add(self, group: SequenceGroup) -> None:
        if group.lora is None:
            return
        if self.slots is None:
            raise ValueError(f"request {group.request_id!r} names a LoRA adapter, and this "
                             "scheduler has no adapter slots")
        self._requests[group.lora_id] += 1

    def hold(self, group: SequenceGroup) -> bool:
        """Give a group about to run its adapter's slot; False while every slot is busy."""
        if group.lora is None or group.lora_slot is not None:
            return True
        assert self.slots is not None  # add() refuses a LoRA request without slots
        slot = self.slots.acquire(group.lora_id)
        if slot is None:
            return False
        self._specs[group.lora_id] = group.lora
        group.lora_slot = slot
        return True

    def release(self, group: SequenceGroup) -> None:
        """The group stops running (preempted, or done)."""
        if group.lora_slot is not None:
            assert self.slots is not None  # a slot was held, so there are slots
            self.slots.release(group.lora_id)
            group.lora_slot = None

    def retire(self, group: SequenceGroup) -> None:
        """The request is over; an adapter unloaded meanwhile goes with its last request."""
        if group.lora is None:
            return
        self.release(group)
        lora_id = group.lora_id
        self._requests[lora_id] -= 1
        if not self._requests[lora_id]:
            del self._requests[lora_id]
            if lora_id in self._closing:
                self._forget(lora_id)

    def unload(self, lora_id: int) -> bool:
        """Drop an adapter: now if no request uses it (True), else once the last one ends."""
        if self._requests[lora_id]:
            self._closing.add(lora_id)
            return False
        self._requests.pop(lora_id, None)
        self._forget(lora_id)
        return True

    def reopen(self, lora_id: int) -> None:
        """Cancel an unload still waiting for its requests (the adapter is wanted again)."""
        self._closing.discard(lora_id)

    @staticmethod
    def count(groups) -> dict[str, int]:
        """Requests per adapter name among `groups`."""
        counts: Counter[str] = Counter(group.lora.name for group in groups
                                       if group.lora is not None)
        return dict(counts)

    def attach(self, step: StepInput) -> None:
        """Put the loads decided for this step, and the unloads since the last, on it."""
        if self.slots is None:
            return
        step.lora_loads.extend((slot, self._specs[lora_id])
                               for slot, lora_id in self.slots.take_loads())
        step.lora_unloads.extend(self._unloads)
        self._unloads.clear()

    def _forget(self, lora_id: int) -> None:
        if self.slots is not None:
            self.slots.forget(lora_id)
        self._specs.pop(lora_id, None)
        self._closing.discard(lora_id)
        self._unloads.append(lora_id)
        if self.on_unloaded is not None:
            self.on_unloaded(lora_id)
