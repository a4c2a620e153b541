"""The LoRA adapters resident on the device for one parallel linear layer, by slot.

A batch runs its base projection once; `LoRAStack.apply` then adds, for each
token, the adapter of its slot (kernels/lora.NO_ADAPTER: none): one batched
shrink for all the layer's parts (q, k, v side by side in A), and one batched
expand per adapted part (kernels/lora.py). The model runner sorts a step's
tokens by slot, so each adapter's tokens are a few contiguous runs (segments):
on CPU each segment is one matmul on a slice of rows, with no gathering; on
CUDA the segment kernels (SGMV) take steps with long runs (prefills), the
per-token ones (BGMV) the rest. Under tensor parallelism each rank holds its
own slice, as S-LoRA shards them, so no collective is added beyond the base
layer's:

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
from pagedserve.worker.layers.linear import ColumnParallelLinear, RowParallelLinear, base_weight

# Where each adapted projection lives in our layers: (fused layer, part index).
PARTS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
         "o_proj": ("o_proj", 0), "gate_proj": ("gate_up_proj", 0),
         "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0)}
# On CUDA, steps whose longest segment has at least this many rows take the SGMV kernels.
SGMV_MIN_ROWS = 16


class LoRABatch:
    """The adapter slots of the step being run, shared by every stack of a model."""

    def __init__(self) -> None:
        # [T] int32, NO_ADAPTER: the base model; None: no adapter in the step.
        self.slots: torch.Tensor | None = None
        self.present: set[int] = set()  # the slots that occur
        self.segments: list[tuple[int, int, int]] = []  # (slot, first row, end row) runs
        self.segment_tensors: lora_kernels.Segments | None = None  # the same, on the device
        self.max_length = 0  # rows of the longest segment

    def set(self, token_slots: np.ndarray | None, device: torch.device) -> None:
        if token_slots is None or not (token_slots != lora_kernels.NO_ADAPTER).any():
            self.slots, self.present, self.segments = None, set(), []
            return
        # Where a run begins: the first row, and every row whose slot differs from the last.
        starts = np.flatnonzero(np.r_[True, token_slots[1:] != token_slots[:-1]])
        ends = np.append(starts[1:], len(token_slots))
        run_slots = token_slots[starts]
        keep = run_slots != lora_kernels.NO_ADAPTER
        starts, ends, run_slots = starts[keep], ends[keep], run_slots[keep]
        self.segments = list(zip(run_slots.tolist(), starts.tolist(), ends.tolist(), strict=True))
        self.present = set(run_slots.tolist())
        self.max_length = int((ends - starts).max())
        self.slots = torch.from_numpy(token_slots.astype(np.int32)).to(device, non_blocking=True)
        if device.type == "cuda":
            table = torch.from_numpy(np.stack([starts, ends - starts, run_slots]).astype(np.int32))
            table = table.to(device, non_blocking=True)
            self.segment_tensors = (table[0], table[1], table[2])


class LoRAStack:
    """Stacked A and B per part of a fused layer (q, k, v; gate, up; or the one of o, down)."""

    def __init__(self, layer: ColumnParallelLinear | RowParallelLinear, max_loras: int,
                 max_rank: int, batch: LoRABatch | None = None) -> None:
        self.batch = batch
        weight = base_weight(layer)
        self.tp, self.max_rank = layer.tp, max_rank
        self.row_parallel = isinstance(layer, RowParallelLinear)
        if self.row_parallel:
            self.in_features, self.part_sizes = layer.part_size, [weight.shape[0]]
        else:
            self.in_features, self.part_sizes = weight.shape[1], list(layer.part_sizes)
        options = {"dtype": weight.dtype, "device": weight.device}
        # A of every part side by side: [slots, parts * max_rank, in], shrunk in one go.
        self.a = torch.zeros(max_loras, len(self.part_sizes) * max_rank, self.in_features,
                             **options)
        self.b = [torch.zeros(max_loras, size, max_rank, **options) for size in self.part_sizes]
        self.scaling = torch.zeros(max_loras, dtype=torch.float32, device=weight.device)
        self.host_scaling = [0.0] * max_loras
        self.adapted = [set() for _ in self.part_sizes]  # per part, the slots that adapt it

    def set(self, slot: int, pairs: dict[int, tuple[torch.Tensor, torch.Tensor]],
            scaling: float) -> None:
        """Put an adapter in `slot`: per part index, its full (A [r, in], B [out, r])."""
        self.clear(slot)
        self.scaling[slot] = self.host_scaling[slot] = scaling
        for part, (a, b) in pairs.items():
            rank = a.shape[0]
            if rank > self.max_rank:
                raise ValueError(f"rank {rank} exceeds max_rank={self.max_rank}")
            if self.row_parallel:  # this rank's input columns
                a = a[:, self.tp.rank * self.in_features:(self.tp.rank + 1) * self.in_features]
            else:  # this rank's output rows of the part
                size = self.part_sizes[part]
                b = b[self.tp.rank * size:(self.tp.rank + 1) * size]
            first = part * self.max_rank
            self.a[slot, first:first + rank].copy_(a)
            self.b[part][slot, :, :rank].copy_(b)
            self.adapted[part].add(slot)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, *self.b))

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """The layer's hook: out += the deltas of the batch's adapters (see `apply`)."""
        batch = self.batch
        if batch is not None and batch.slots is not None:
            self.apply(x, out, batch)

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        for part in range(len(self.part_sizes)):
            self.b[part][slot].zero_()
            self.adapted[part].discard(slot)
        self.scaling[slot] = self.host_scaling[slot] = 0.0

    def apply(self, x: torch.Tensor, out: torch.Tensor, batch: LoRABatch) -> None:
        """out += each token's adapter delta, in place.

        `out` is the layer's output before any all-reduce (a row-parallel
        layer's partial sum), its parts side by side as the layer computes them.
        """
        if not any(self.adapted[part] & batch.present for part in range(len(self.part_sizes))):
            return
        rank = self.max_rank
        if not x.is_cuda:
            h = reference.sgmv_shrink(x, self.a, batch.segments, self.host_scaling)
        elif batch.max_length >= SGMV_MIN_ROWS:
            h = lora_kernels.sgmv_shrink(x, self.a, batch.segment_tensors, batch.max_length,
                                         self.scaling)
        else:
            h = lora_kernels.lora_shrink(x, self.a, batch.slots, self.scaling)
        offset = 0
        for part, size in enumerate(self.part_sizes):
            adapted = self.adapted[part]
            if adapted & batch.present:
                target, hp = out[:, offset:offset + size], h[:, part * rank:(part + 1) * rank]
                if not x.is_cuda:
                    reference.sgmv_expand(target, hp, self.b[part],
                                          [seg for seg in batch.segments if seg[0] in adapted])
                elif batch.max_length >= SGMV_MIN_ROWS:
                    lora_kernels.sgmv_expand(target, hp, self.b[part], batch.segment_tensors,
                                             batch.max_length)
                else:
                    lora_kernels.lora_expand(target, hp, self.b[part], batch.slots)
            offset += size
