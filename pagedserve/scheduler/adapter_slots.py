"""Which LoRA adapters hold the device's `max_loras` slots, and who is using them.

The device keeps `max_loras` adapters in stacked, preallocated buffers
(worker/layers/lora.py), so a step can mix at most that many distinct
adapters. Here the scheduler's side of it:

- `acquire(lora_id)` gives the adapter a slot for a sequence group about to
  run: the slot it already has, a free one, or the one of the adapter idle
  the longest (least recently used), which is evicted. None when every slot
  is in use by running groups: the group waits, and since the scheduler
  admits in arrival order, it is never overtaken and never starves.
- `release(lora_id)` when a group stops running (finished, aborted,
  preempted). An adapter nobody uses stays resident, first in line for
  eviction, so a request that comes back for it finds it loaded.
- `take_loads()`: the (slot, lora_id) pairs acquired into a slot since the
  last call, which the worker must load before the step runs.
"""

from __future__ import annotations

from collections import OrderedDict


class AdapterSlots:
    def __init__(self, max_loras: int) -> None:
        if max_loras < 1:
            raise ValueError(f"max_loras={max_loras}: at least one adapter slot is needed")
        self.max_loras = max_loras
        self._slot: dict[int, int] = {}  # resident lora_id -> slot
        self._users: dict[int, int] = {}  # resident lora_id -> running groups using it
        self._idle: OrderedDict[int, None] = OrderedDict()  # resident, unused; oldest first
        self._free = list(range(max_loras - 1, -1, -1))  # slots never used, lowest last
        self._loads: list[tuple[int, int]] = []
        self.loads = 0  # adapters put into a slot, so far
        self.evictions = 0

    def slot(self, lora_id: int) -> int | None:
        return self._slot.get(lora_id)

    def resident(self) -> list[int]:
        """The adapters in slots, in slot order."""
        return sorted(self._slot, key=self._slot.__getitem__)

    def users(self, lora_id: int) -> int:
        return self._users.get(lora_id, 0)

    def can_acquire(self, lora_id: int) -> bool:
        return lora_id in self._slot or bool(self._free) or bool(self._idle)

    def acquire(self, lora_id: int) -> int | None:
        """A slot for one more running group of `lora_id`, or None if all are in use."""
        if lora_id < 1:
            raise ValueError(f"lora_id={lora_id}: adapter ids are >= 1 (0 is the base model)")
        slot = self._slot.get(lora_id)
        if slot is None:
            if self._free:
                slot = self._free.pop()
            elif self._idle:
                evicted, _ = self._idle.popitem(last=False)
                slot = self._slot.pop(evicted)
                del self._users[evicted]
                self.evictions += 1
            else:
                return None
            self._slot[lora_id], self._users[lora_id] = slot, 0
            self._loads.append((slot, lora_id))
            self.loads += 1
        self._idle.pop(lora_id, None)
        self._users[lora_id] += 1
        return slot

    def release(self, lora_id: int) -> None:
        users = self._users.get(lora_id, 0)
        if users < 1:
            raise ValueError(f"lora_id={lora_id} is not in use: release without acquire")
        self._users[lora_id] = users - 1
        if users == 1:
            self._idle[lora_id] = None  # newest idle: evicted last

    def forget(self, lora_id: int) -> bool:
        """Drop an idle adapter (unloaded by the user); False while groups still use it."""
        if lora_id not in self._slot:
            return True
        if self._users[lora_id]:
            return False
        self._idle.pop(lora_id)
        self._free.append(self._slot.pop(lora_id))
        del self._users[lora_id]
        self._loads = [(s, i) for s, i in self._loads if i != lora_id]
        return True

    def take_loads(self) -> list[tuple[int, int]]:
        loads, self._loads = self._loads, []
        return loads
