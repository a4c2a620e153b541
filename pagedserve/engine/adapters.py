"""The LoRA adapters an engine knows: each checked once, then named by its id.

The first request naming an adapter (or a load at run time) registers it: its
config is read and checked (lora_request.py) and its weights are read and
checked against the base model's shapes (worker/lora_weights.py). Anything
wrong is a RequestError naming the problem, and nothing is kept. The workers
read the weights again when the scheduler first gives the adapter a slot.

An id stands for one adapter: one name and one path; a second name or path
under a known id is refused. A known name under a new id replaces the adapter
of the old id once no request uses it (refused until then), since the prefix
cache keys an adapter's blocks by its name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from pagedserve.config import LoRAConfig
from pagedserve.errors import RequestError
from pagedserve.lora_request import AdapterSpec, LoRARequest, read_adapter_config
from pagedserve.worker.lora_weights import load_lora_weights

_PARAM = "lora_request"


class AdapterRegistry:
    def __init__(self, config: LoRAConfig | None, hf_config,
                 unload: Callable[[int], bool] = lambda lora_id: True) -> None:
        self.config = config
        self._unload = unload  # drops an adapter now if unused (True), else once it is
        self._hf_config = hf_config
        self._by_id: dict[int, AdapterSpec] = {}
        self._ids: dict[str, int] = {}  # name -> id
        self._requests: dict[int, LoRARequest] = {}  # id -> the request that registered it
        self._closing: set[int] = set()  # unloaded while in use: no new requests

    def resolve(self, request: LoRARequest | None) -> AdapterSpec | None:
        """The adapter a request runs under, registering it on first sight."""
        if request is None:
            return None
        if not isinstance(request, LoRARequest):
            raise RequestError(_PARAM, f"lora_request must be a LoRARequest or None, got "
                                       f"{type(request).__name__}")
        if self.config is None:
            raise RequestError(_PARAM, f"lora_request {request.lora_name!r}: LoRA is not "
                                       "enabled on this engine (enable_lora=True)")
        lora_id, name = request.lora_int_id, request.lora_name
        if lora_id in self._closing:
            raise RequestError(_PARAM, f"adapter {name!r} (id {lora_id}) is being unloaded")
        known = self._by_id.get(lora_id)
        if known is not None:
            first = self._requests[lora_id]
            if (first.lora_name, str(first.lora_path)) != (name, str(request.lora_path)):
                raise RequestError(_PARAM, f"lora_int_id {lora_id} is adapter {known.name!r} "
                                           f"at {str(first.lora_path)!r}; one id names one "
                                           "adapter")
            return known
        if name in self._ids and not self._unload(self._ids[name]):
            raise RequestError(_PARAM, f"lora_name {name!r} is adapter id {self._ids[name]}, "
                                       f"which still has requests running; id {lora_id} can "
                                       "take the name once they end")
        spec = read_adapter_config(request.lora_path, self.config.max_lora_rank)
        load_lora_weights(spec, self._hf_config)  # shapes checked; nothing is kept
        spec = dataclasses.replace(spec, name=name, lora_id=lora_id)
        self._by_id[lora_id], self._ids[name] = spec, lora_id
        self._requests[lora_id] = request
        return spec

    def requests(self) -> list[LoRARequest]:
        """The registered adapters not being unloaded, by id, as they were requested."""
        return [request for lora_id, request in sorted(self._requests.items())
                if lora_id not in self._closing]

    def closing(self, lora_id: int) -> None:
        """Unloaded while requests still use it: refuse new ones until `remove`."""
        self._closing.add(lora_id)

    def reopen(self, lora_id: int) -> None:
        self._closing.discard(lora_id)

    def remove(self, lora_id: int) -> None:
        spec = self._by_id.pop(lora_id, None)
        if spec is not None:
            del self._ids[spec.name], self._requests[lora_id]
        self._closing.discard(lora_id)
