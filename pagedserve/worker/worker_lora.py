"""A worker's LoRA adapters: `max_loras` device slots and a host cache of `max_cpu_loras`.

Every adaptable projection (qkv, o, and of a dense MLP gate_up, down) of every decoder
layer gets a LoRAStack (layers/lora.py) of `max_loras` slots, preallocated at the
engine's `max_lora_rank`, before the KV pool is sized, so the pool is what is
left after them. The scheduler decides which adapter holds which slot
(scheduler/adapter_slots.py); a step carries the loads it decided on, and they are
applied before the step runs:

    step.lora_loads = [(slot, spec)]   slot <- the adapter's weights (from the host
                                       cache, or read from its files)
    step.lora_unloads = [lora_id]      the adapter is gone: drop it from the host cache

A step's tokens then name their slots (kernels/lora.NO_ADAPTER: the base model),
and each layer adds its adapters' deltas to the base projection in place.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from pagedserve.config import LoRAConfig
from pagedserve.lora_request import AdapterSpec
from pagedserve.worker.layers.lora import PARTS, LoRABatch, LoRAStack
from pagedserve.worker.lora_weights import LoRAWeights, load_lora_weights


class WorkerLoRA:
    def __init__(self, model: nn.Module, config: LoRAConfig, hf_config,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.config, self.hf_config, self.dtype = config, hf_config, dtype
        self.device = device
        self.batch = LoRABatch()
        # (layer index, fused layer name) -> its stack
        self.stacks: dict[tuple[int, str], LoRAStack] = {}
        for index, layer in enumerate(model.model.layers):
            modules = [("qkv_proj", layer.self_attn.qkv_proj),
                       ("o_proj", layer.self_attn.o_proj)]
            if hasattr(layer.mlp, "gate_up_proj"):  # a dense MLP; experts take no adapter
                modules += [("gate_up_proj", layer.mlp.gate_up_proj),
                            ("down_proj", layer.mlp.down_proj)]
            for name, module in modules:
                stack = LoRAStack(module, config.max_loras, config.max_lora_rank, self.batch)
                module.lora = stack
                self.stacks[index, name] = stack
        self._host: OrderedDict[int, LoRAWeights] = OrderedDict()  # lora_id -> weights, LRU

    @property
    def slot_bytes(self) -> int:
        """Device memory of every slot of every layer."""
        return sum(stack.nbytes for stack in self.stacks.values())

    def apply(self, loads: list[tuple[int, AdapterSpec]], unloads: list[int]) -> None:
        for lora_id in unloads:
            self._host.pop(lora_id, None)
        for slot, spec in loads:
            weights = self._weights(spec)
            grouped: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
            for (layer, module), pair in weights.pairs.items():
                fused, part = PARTS[module]
                grouped.setdefault((layer, fused), {})[part] = pair
            for key, stack in self.stacks.items():
                pairs = grouped.get(key)
                if pairs:
                    stack.set(slot, pairs, spec.scaling)
                else:
                    stack.clear(slot)

    def _weights(self, spec: AdapterSpec) -> LoRAWeights:
        weights = self._host.get(spec.lora_id)
        if weights is None or weights.spec != spec:
            weights = load_lora_weights(spec, self.hf_config, self.dtype)
            self._host[spec.lora_id] = weights
            while len(self._host) > self.config.cpu_capacity:
                self._host.popitem(last=False)
        self._host.move_to_end(spec.lora_id)
        return weights

    def set_tokens(self, token_slots: np.ndarray | None) -> None:
        """The step's slot per token row, in the order the model sees them (None: all base)."""
        self.batch.set(token_slots, self.device)
