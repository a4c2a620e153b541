"""The LoRA adapters the endpoint serves by name, beside the base model.

Clients pick an adapter by passing its name as `model`. `lora.modules` are
served from the start (the engines register them when they are built, with
ids 1, 2, ... in config order); with `lora.allow_runtime_updates`, vLLM's

    POST /v1/load_lora_adapter    {"lora_name": "sql", "lora_path": "/adapters/sql"}
    POST /v1/unload_lora_adapter  {"lora_name": "sql"}

add and remove more. A load is checked by a replica's engine first (the files,
the rank, the shapes against the base model), so a bad adapter is a 400 and
is never listed. Each request carries its adapter's LoRARequest, so a replica
that has not seen the adapter yet registers it on the way. After an unload
new requests for the name get a 404; those already running finish under it.
A name loaded again gets a new id, and the replicas replace the old one once
its last request ends.
"""

from __future__ import annotations

import itertools

from pydantic import BaseModel, ConfigDict, Field

from pagedserve.cluster import errors
from pagedserve.config import LoRAConfig
from pagedserve.lora_request import LoRARequest


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's field; the name decides


class AdapterTable:
    def __init__(self, config: LoRAConfig, base_name: str) -> None:
        self.config, self.base_name = config, base_name
        self._adapters = {module.name: LoRARequest(module.name, index, module.path)
                          for index, module in enumerate(config.modules, start=1)}
        self._ids = itertools.count(len(config.modules) + 1)

    def names(self) -> list[str]:
        return [self.base_name, *self._adapters]

    def adapters(self) -> list[LoRARequest]:
        return list(self._adapters.values())

    def resolve(self, model: str) -> LoRARequest | None:
        """The adapter a request's `model` names (None: the base); 404 for an unknown name."""
        if model == self.base_name:
            return None
        adapter = self._adapters.get(model)
        if adapter is None:
            raise errors.not_found_model(model, self.names())
        return adapter

    def check_updates_allowed(self) -> None:
        if not self.config.allow_runtime_updates:
            raise errors.OpenAIError(404, "loading and unloading LoRA adapters at run time is "
                                          "off (lora.allow_runtime_updates)", code="not_found")

    def new(self, body: LoadLoRAAdapterRequest) -> LoRARequest:
        """The adapter a load asks for, not yet added (a replica checks it first)."""
        if body.lora_name == self.base_name or body.lora_name in self._adapters:
            raise errors.bad_request(f"The lora adapter '{body.lora_name}' has already been "
                                     "loaded.", "lora_name")
        return LoRARequest(body.lora_name, next(self._ids), body.lora_path)

    def add(self, adapter: LoRARequest) -> None:
        self._adapters[adapter.lora_name] = adapter

    def remove(self, body: UnloadLoRAAdapterRequest) -> LoRARequest:
        adapter = self._adapters.pop(body.lora_name, None)
        if adapter is None:
            raise errors.OpenAIError(404, f"The lora adapter '{body.lora_name}' cannot be "
                                          "found.", param="lora_name", code="not_found")
        return adapter
