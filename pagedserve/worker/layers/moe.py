"""Mixture-of-experts MLP: a router picks each token's top-k experts, and the token's
hidden state goes through those experts' SwiGLU MLPs, weighted by the router.

A layer's experts are two stacked parameters (`FusedMoE`), filled from the
checkpoint's per-expert tensors (Mixtral's `experts.{e}.w1/w3/w2`, Qwen3-MoE's
`experts.{e}.gate_proj/up_proj/down_proj`):

    w13: [local experts, 2 * I of this rank, H]   gate rows, then up rows
    w2:  [local experts, H, I of this rank]

Parallelism, over the ranks of the tensor-parallel group:
    tensor parallel (default): every rank holds every expert, and 1/tp of each
        expert's intermediate features, as LlamaMLP splits its MLP;
    expert parallel (`enable_expert_parallel`): rank r holds experts
        [r E/tp, (r+1) E/tp) whole.
Either way every rank sees every token (the hidden states are whole on every
rank after attention's all-reduce) and computes its experts' share of each
token, and the layer's one all-reduce sums the shares: under expert
parallelism that sum is the combine that brings each token's outputs back
from the ranks of its experts.

The experts run, by device and dtype:
    cuda          kernels/fused_moe.py: two grouped GEMMs over tokens sorted by expert
    cpu, float32  kernels/cpu_kernels.py's `fused_moe` (C++), on weights packed once
                  at load into its blocked layout
    cpu, other    tokens grouped by expert, one oneDNN GEMM per expert a token chose,
                  on each expert's weights packed once at load (kernels/cpu_gemm.py)
    cpu, kept     tokens grouped by expert, the quantized GEMM of each expert chosen
    quantized     (layers/quantized.py: each expert's gate/up and down weights)
and kernels/reference.py's `moe` is the oracle of them all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.kernels import cpu_gemm, cpu_kernels
from pagedserve.worker.distributed import TPGroup
from pagedserve.worker.layers.linear import check_shape, checkpoint_shape
from pagedserve.worker.layers.quantized import (
    collect,
    experts_made_whole,
    new_weight,
    quantized_of,
)

# The parts of an expert's MLP, by the checkpoint names of each layout.
EXPERT_PARTS = {"w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", 0),
                "gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", 0)}


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] float32, expert ids [T, k]): the softmax over
    all experts, its top k, and with `renormalize` those k scaled to sum to one (Mixtral;
    Qwen3-MoE's `norm_topk_prob`), which is the softmax over the top-k logits."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, tp: TPGroup, expert_parallel: bool = False) -> None:
        super().__init__()
        self.tp, self.top_k, self.renormalize = tp, top_k, renormalize
        self.num_experts = num_experts
        if expert_parallel:
            self.num_local = tp.split(num_experts, "num_experts")
            self.inter = intermediate_size
        else:
            self.num_local = num_experts
            self.inter = tp.split(intermediate_size, "experts' intermediate_size")
        self.first_expert = tp.rank * self.num_local if expert_parallel else 0
        self.expert_parallel = expert_parallel
        self.w13 = new_weight(self.num_local, 2 * self.inter, hidden_size)
        self.w2 = new_weight(self.num_local, hidden_size, self.inter)
        # Shard ids: w13 has a gate and an up part per expert, w2 one part per expert.
        self.w13.weight_loader, self.w13.num_parts = self.load_expert, 2 * num_experts
        self.w2.weight_loader, self.w2.num_parts = self.load_expert, num_experts
        # Set by pack_for_cpu: the C++ kernel's blocked (w13, w2), or oneDNN's per expert.
        self.blocked: tuple[torch.Tensor, torch.Tensor] | None = None
        self.packed: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def local_index(self, expert: int) -> int | None:
        local = expert - self.first_expert
        return local if 0 <= local < self.num_local else None

    def load_expert(self, param: torch.Tensor, loaded, shard_id: int | None) -> None:
        """One expert's w1/w3 (gate/up) or w2 (down), by shard id: 2 e + part for w13, e for
        w2. A rank keeps its slice of the experts it holds and skips the others."""
        assert shard_id is not None
        is_w13 = param is self.w13
        expert, part = divmod(shard_id, 2) if is_w13 else (shard_id, 0)
        local = self.local_index(expert)
        full = self.inter * (1 if self.expert_parallel else self.tp.size)
        hidden = param.shape[2] if is_w13 else param.shape[1]
        check_shape(checkpoint_shape(loaded), (full, hidden) if is_w13 else (hidden, full))
        if local is None:
            return
        start = 0 if self.expert_parallel else self.tp.rank * self.inter
        if hasattr(param, "quant_parts"):
            inter = slice(start, start + self.inter)
            collect(param, (local, part), loaded, *((inter, slice(None)) if is_w13
                                                    else (slice(None), inter)))
            return
        if is_w13:
            param.data[local].narrow(0, part * self.inter, self.inter).copy_(
                loaded[start:start + self.inter])
        else:
            param.data[local].copy_(loaded[:, start:start + self.inter])

    def finalize_quantized(self, dtype: torch.dtype, device: torch.device) -> int:
        """After quantized loading: each expert's weights kept quantized where every part
        came so (layers/quantized.py), else the float stacks. Returns how many stayed."""
        kept = 0
        for name, parts_of in (("w13", lambda e: [(e, 0), (e, 1)]), ("w2", lambda e: [(e, 0)])):
            param = getattr(self, name)
            joined = experts_made_whole([[param.quant_parts[key] for key in parts_of(expert)]
                                         for expert in range(self.num_local)], dtype, device)
            if isinstance(joined, torch.Tensor):
                new = nn.Parameter(joined, requires_grad=False)
            else:
                new = nn.Parameter(torch.empty(param.shape, device="meta"), requires_grad=False)
                new.quantized = joined
                kept += 1
            new.weight_loader, new.num_parts = self.load_expert, param.num_parts
            setattr(self, name, new)
        return kept

    def pack_for_cpu(self, kernel: bool = True) -> bool:
        """The experts packed once (pack_linear_weights calls this): float32 for the C++
        kernel, other dtypes (and float32 with `kernel=False`) for oneDNN, expert by
        expert. The stacked parameters become meta tensors, as a packed linear's weight
        does."""
        if self.w13.device.type != "cpu" or quantized_of(self.w13) is not None:
            return False
        if kernel and self.w13.dtype == torch.float32 and cpu_kernels.usable():
            self.blocked = cpu_kernels.pack_moe(self.w13.data, self.w2.data)
        elif all(cpu_gemm.can_pack(w[0]) for w in (self.w13, self.w2)):
            self.packed = ([cpu_gemm.pack(w) for w in self.w13.data],
                           [cpu_gemm.pack(w) for w in self.w2.data])
        else:
            return False
        for name in ("w13", "w2"):
            old = getattr(self, name)
            new = nn.Parameter(old.to("meta"), requires_grad=False)
            new.weight_loader, new.num_parts = self.load_expert, old.num_parts
            setattr(self, name, new)
        return True

    def dense_weights(self) -> dict[str, torch.Tensor]:
        """w13 and w2 as plain tensors, packed, quantized or not."""
        if quantized_of(self.w13) is not None:
            return {name: torch.stack([w.dense() for w in quantized_of(getattr(self, name))])
                    for name in ("w13", "w2")}
        if self.blocked is not None:
            w13, w2 = cpu_kernels.unpack_moe(*self.blocked, self.w2.shape[1], self.inter)
            return {"w13": w13, "w2": w2}
        if self.packed is None:
            return {"w13": self.w13.data, "w2": self.w2.data}
        return {name: torch.stack([w.to_dense() for w in packed])
                for name, packed in zip(("w13", "w2"), self.packed, strict=True)}

    @property
    def capturable(self) -> bool:
        """Whether a CUDA graph can record the layer: not with quantized experts that
        fused_moe cannot take (not stacked alike), which run one GEMM pair per expert
        chosen (`_grouped`), counting the tokens on the host."""
        return quantized_of(self.w13) is None or self._stacked() is not None

    def _stacked(self) -> tuple | None:
        """Quantized w13 and w2 as fused_moe takes them, where both were stacked."""
        w13, w2 = quantized_of(self.w13), quantized_of(self.w2)
        if w13 is None or w13.stacked is None or w2.stacked is None:
            return None
        return w13.stacked, w2.stacked

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], router_logits [T, E] -> this rank's share of the layer's output,
        summed over the ranks."""
        weights, ids = route(router_logits, self.top_k, self.renormalize)
        return self.tp.all_reduce(self.experts(hidden, weights, ids))

    def experts(self, hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                ) -> torch.Tensor:
        """This rank's experts over each token's top-k (weights, global ids): [T, H]."""
        stacked = self._stacked()
        if stacked is not None:  # quantized experts packed for Triton
            from pagedserve.kernels.fused_moe import fused_moe

            return fused_moe(hidden, *stacked, weights, ids, self.first_expert)
        if hidden.device.type == "cuda" and quantized_of(self.w13) is None:
            from pagedserve.kernels.fused_moe import fused_moe  # Triton: CUDA only

            return fused_moe(hidden, self.w13, self.w2, weights, ids, self.first_expert)
        if self.blocked is not None:
            return cpu_kernels.fused_moe(hidden, *self.blocked, weights, ids, self.first_expert)
        return self._grouped(hidden, weights, ids)

    def _grouped(self, hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                 ) -> torch.Tensor:
        """The (token, expert) pairs sorted by expert; one GEMM pair per expert chosen."""
        top_k = ids.shape[1]
        flat = ids.flatten() - self.first_expert
        flat = torch.where((flat >= 0) & (flat < self.num_local), flat, self.num_local)
        order = torch.sort(flat, stable=True).indices
        counts = torch.bincount(flat, minlength=self.num_local + 1).tolist()
        num_local_pairs = len(order) - counts[self.num_local]  # the rest: other ranks'
        order = order[:num_local_pairs]
        rows = order // top_k
        x = hidden.index_select(0, rows)
        out = torch.empty_like(x)
        start = 0
        for expert, count in enumerate(counts[:self.num_local]):
            if count:
                end = start + count
                gate, up = self._linear(x[start:end], expert, 0).split(self.inter, dim=-1)
                out[start:end] = self._linear(F.silu(gate) * up, expert, 1)
                start = end
        out *= weights.flatten()[order].unsqueeze(1).to(out.dtype)
        return torch.zeros_like(hidden).index_add_(0, rows, out)

    def _linear(self, x: torch.Tensor, expert: int, which: int) -> torch.Tensor:
        quantized = quantized_of((self.w13, self.w2)[which])
        if quantized is not None:
            return quantized[expert].linear(x, None)
        if self.packed is not None:
            return cpu_gemm.linear(x, self.packed[which][expert], None)
        return F.linear(x, (self.w13, self.w2)[which][expert])
