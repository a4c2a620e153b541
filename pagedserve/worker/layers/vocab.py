"""Vocab-parallel embedding and LM head: each rank holds a contiguous range of rows.

The vocabulary is padded up to a multiple of the group size, so rank r holds
rows [r n, (r+1) n) with n = ceil(vocab / tp); padding rows are zero and never
looked up. The embedding looks up the ids in its range and all-reduces (other
ranks contribute zeros); the LM head computes logits for its range and gathers
them on rank 0, the only rank that samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.math_utils import cdiv
from pagedserve.worker.distributed import TPGroup
from pagedserve.worker.layers.linear import apply_linear, check_shape, checkpoint_shape
from pagedserve.worker.layers.quantized import collect, new_weight, quantized_of


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows = cdiv(vocab_size, tp.size)
        self.start = tp.rank * self.rows
        self.end = min(self.start + self.rows, vocab_size)  # real rows end here
        self.weight = new_weight(self.rows, hidden_size)
        self.weight.weight_loader = self.load_weight

    def load_weight(self, param: torch.Tensor, loaded, shard_id: int | None) -> None:
        check_shape(checkpoint_shape(loaded), (self.vocab_size, param.shape[1]))
        real = max(0, self.end - self.start)
        if hasattr(param, "quant_parts"):  # padding rows are added when it is made whole
            collect(param, 0, loaded, slice(self.start, self.start + real), slice(None))
            return
        param.data[:real].copy_(loaded[self.start:self.start + real])
        param.data[real:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self._lookup(input_ids)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        hidden = self._lookup(local.masked_fill(outside, 0))
        return self.tp.all_reduce(hidden.masked_fill_(outside.unsqueeze(-1), 0.0))


    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        quantized = quantized_of(self.weight)
        if quantized is None:
            return F.embedding(ids, self.weight)
        return quantized.rows(ids.flatten()).to(self.weight.dtype).view(*ids.shape, -1)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over this rank's vocab rows, gathered on rank 0 (None on the others)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup) -> None:
        super().__init__(vocab_size, hidden_size, tp)
        self.packed_weight = None  # set by pack_linear_weights

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.tp.gather_last_dim(apply_linear(self, hidden, None))
        return None if logits is None else logits[:, :self.vocab_size]
