"""Attention over the paged KV pool, behind one small interface.

The model hands each layer's q/k/v, its slice of the pool and the step's
`AttentionMetadata` to `Attention`; which implementation runs (the torch
reference here, Triton kernels on GPUs) is the backend's business, not the
model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagedserve.kernels import reference


@dataclass
class AttentionMetadata:
    """Where a step's tokens live in the pool. Shapes as in kernels/reference.py."""

    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    # The torch backend's plan for this step (every layer reads the same positions).
    plan: reference.AttentionPlan


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor],
                metadata: AttentionMetadata) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, H_kv, D] -> [T, H, D]."""
        key_cache, value_cache = kv_cache
        reference.write_kv_cache(k, v, key_cache, value_cache, metadata.slot_mapping)
        return reference.run_attention_plan(q, key_cache, value_cache, metadata.plan, self.scale)
