"""The LoRA adapters resident on the device for one parallel linear layer, by slot.

A batch runs its base projection once; `LoRAStack.apply` then adds, for each
token, the adapter of its slot (-1: none), with one batched shrink and one
batched expand per adapted part (kernels/lora.py; the torch reference on CPU).
Under tensor parallelism each rank holds its own slice, as S-LoRA shards them,
so no collective is added beyond the base layer's:

    column-parallel (qkv, gate_up): A whole, B split by output rows like W;
        h = x A^T on every rank, this rank's rows of h B^T
    row-parallel (o, down): A split by input columns like W, B whole;
        each rank adds its partial h_r B^T before the layer's all-reduce sums them

Adapters of a smaller rank than `max_rank` are zero-padded, which is exact.
"""

from __future__ import annotations

import numpy as np
import torch

from pagedserve.kernels import lora as lora_kernels
from pagedserve.kernels import reference
from pagedserve.worker.layers.linear import ColumnParallelLinear, RowParallelLinear

# Where each adapted projection lives in our layers: (fused layer, part index).
PARTS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
         "o_proj": ("o_proj", 0), "gate_proj": ("gate_up_proj", 0),
         "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0)}


class LoRABatch:
    """The slot of each token row of the step being run, shared by every stack of a model."""

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None  # [T] int32, -1: the base model
        self.present: set[int] = set()  # the slots that occur in `slots`

    def set(self, token_slots: np.ndarray | None, device: torch.device) -> None:
        if token_slots is None or not (token_slots >= 0).any():
            self.slots, self.present = None, set()
            return
        self.present = {int(slot) for slot in np.unique(token_slots) if slot >= 0}
        self.slots = torch.from_numpy(token_slots.astype(np.int32)).to(device, non_blocking=True)


class LoRAStack:
    """Stacked A and B per part of a fused layer (q, k, v; gate, up; or the one of o, down)."""

    def __init__(self, layer: ColumnParallelLinear | RowParallelLinear, max_loras: int,
                 max_rank: int, batch: LoRABatch | None = None) -> None:
        self.batch = batch
        weight = layer.weight
        self.tp, self.max_rank = layer.tp, max_rank
        self.row_parallel = isinstance(layer, RowParallelLinear)
        if self.row_parallel:
            self.in_features, self.part_sizes = layer.part_size, [weight.shape[0]]
        else:
            self.in_features, self.part_sizes = weight.shape[1], list(layer.part_sizes)
        options = {"dtype": weight.dtype, "device": weight.device}
        self.a = [torch.zeros(max_loras, max_rank, self.in_features, **options)
                  for _ in self.part_sizes]
        self.b = [torch.zeros(max_loras, size, max_rank, **options) for size in self.part_sizes]
        self.scaling = torch.zeros(max_loras, dtype=torch.float32, device=weight.device)
        self.adapted = [set() for _ in self.part_sizes]  # per part, the slots that adapt it

    def set(self, slot: int, pairs: dict[int, tuple[torch.Tensor, torch.Tensor]],
            scaling: float) -> None:
        """Put an adapter in `slot`: per part index, its full (A [r, in], B [out, r])."""
        self.clear(slot)
        self.scaling[slot] = scaling
        for part, (a, b) in pairs.items():
            rank = a.shape[0]
            if rank > self.max_rank:
                raise ValueError(f"rank {rank} exceeds max_rank={self.max_rank}")
            if self.row_parallel:  # this rank's input columns
                a = a[:, self.tp.rank * self.in_features:(self.tp.rank + 1) * self.in_features]
            else:  # this rank's output rows of the part
                size = self.part_sizes[part]
                b = b[self.tp.rank * size:(self.tp.rank + 1) * size]
            self.a[part][slot, :rank].copy_(a)
            self.b[part][slot, :, :rank].copy_(b)
            self.adapted[part].add(slot)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a, *self.b))

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """The layer's hook: out += the deltas of the batch's adapters (see `apply`)."""
        batch = self.batch
        if batch is not None and batch.slots is not None:
            self.apply(x, out, batch.slots, batch.present)

    def clear(self, slot: int) -> None:
        for part in range(len(self.part_sizes)):
            self.a[part][slot].zero_()
            self.b[part][slot].zero_()
            self.adapted[part].discard(slot)
        self.scaling[slot] = 0.0

    def apply(self, x: torch.Tensor, out: torch.Tensor, slots: torch.Tensor,
              present: set[int]) -> None:
        """out += each token's adapter delta, in place; `present`: the slots in `slots`.

        `out` is the layer's output before any all-reduce (a row-parallel
        layer's partial sum), its parts side by side as the layer computes them.
        """
        offset = 0
        for part, size in enumerate(self.part_sizes):
            if self.adapted[part] & present:
                target = out[:, offset:offset + size]
                shrink, expand = ((lora_kernels.lora_shrink, lora_kernels.lora_expand)
                                  if x.is_cuda else (reference.lora_shrink, reference.lora_expand))
                h = shrink(x, self.a[part], slots, self.scaling)
                expand(target, h, self.b[part], slots)
            offset += size
