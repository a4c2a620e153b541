"""Mixture-of-experts MLP as two grouped GEMMs over tokens sorted by expert (Triton).

A sparse layer sends each token to its router's top-k experts. With the
(token, expert) pairs sorted by expert and each expert's run padded to a
multiple of BLOCK_M rows, every block of BLOCK_M rows belongs to one expert,
and one launch computes all of them: a program reads its block's expert id,
gathers its rows' hidden states, and multiplies them by that expert's weight
(vLLM's `fused_moe`, in the manner of its `moe_align_block_size`):

    w13: [num_experts, 2 * I, H]   each expert's gate rows, then its up rows
    w2:  [num_experts, H, I]
    align_tokens(topk_ids)      -> sorted pair ids (padded with num_pairs), block experts
    _grouped_gemm(hidden, w13)  -> [pairs, 2I]; silu(gate) * up -> [pairs, I]
    _grouped_gemm(.., w2)       -> [pairs, H], times each pair's router weight
    sum over each token's k pairs -> [T, H]

The alignment runs on the device without reading anything back to the host:
the grid is sized for the worst case (every expert's run one row past a
block), and blocks past the last run have expert -1 and return at once. With
expert parallelism a rank holds experts [first, first + num_local); pairs
routed elsewhere go to a last bucket whose blocks are skipped, and their rows
stay zero, so the layer's all-reduce adds the other ranks' shares.

Experts kept quantized come as quant_gemm.py's weights stacked by expert
(`quant_gemm.stack`): the same launch, each program's weight tile read as codes
and scaled by its group's scale and offset through quant_gemm's `quant_dot`.

`kernels/reference.py`'s `moe` is the oracle (tests/kernels/test_fused_moe.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pagedserve.kernels.checks import check_launchable, check_tensor
from pagedserve.kernels.common import dot, dot_in_f32
from pagedserve.kernels.quant_gemm import QuantGemmWeight, k_tile, quant_dot

MOE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def align_tokens(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                 first_expert: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] (global expert ids) -> (sorted_pairs [max_rows] int32, block_experts
    [max_rows // block_m] int32).

    sorted_pairs lists the pairs t * k + j of each local expert in turn, each expert's
    run padded with num_pairs to a multiple of block_m; block_experts gives each block's
    local expert, or -1 for a block of padding or of pairs routed to other ranks' experts.
    """
    flat = topk_ids.flatten().to(torch.int64) - first_expert
    num_pairs = flat.numel()
    # Experts held elsewhere (expert parallelism) share the bucket past the local ones.
    flat = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    counts = torch.bincount(flat, minlength=num_experts + 1)
    padded = (counts + block_m - 1) // block_m * block_m
    run_ends = torch.cumsum(padded, 0)
    order = torch.sort(flat, stable=True).indices
    experts = flat[order]
    # A pair's row: its expert's run start, plus its place among that expert's pairs.
    pair_starts = torch.cumsum(counts, 0) - counts
    rank_in_run = torch.arange(num_pairs, device=flat.device) - pair_starts[experts]
    max_rows = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    # The other ranks' bucket goes past every block, and is cut off.
    rows = torch.where(experts < num_experts, run_ends[experts] - padded[experts], max_rows)
    sorted_pairs = torch.full((max_rows + num_pairs,), num_pairs, dtype=torch.int32,
                              device=flat.device)
    sorted_pairs[rows + rank_in_run] = order.to(torch.int32)
    sorted_pairs = sorted_pairs[:max_rows]
    block_starts = torch.arange(0, max_rows, block_m, device=flat.device)
    block_experts = torch.searchsorted(run_ends[:num_experts], block_starts, right=True)
    block_experts = torch.where(block_experts < num_experts, block_experts, -1).to(torch.int32)
    return sorted_pairs, block_experts


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_pairs_ptr, block_experts_ptr, num_pairs,
    stride_am, stride_be, stride_bn, stride_cm,
    N: tl.constexpr, K: tl.constexpr, A_ROWS_PER_PAIR: tl.constexpr,
    MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
):
    """c[pair] = a[pair // A_ROWS_PER_PAIR] @ b[expert]^T (times weights[pair]) for the
    BLOCK_M sorted pairs of this program's block and BLOCK_N of the N output features."""
    block = tl.program_id(0)
    expert = tl.load(block_experts_ptr + block).to(tl.int64)
    if expert < 0:
        return
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + offs_m).to(tl.int64)
    in_m = pairs < num_pairs
    rows = pairs // A_ROWS_PER_PAIR
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + offs_k[None, :],
                    mask=in_m[:, None] & in_k[None, :], other=0.0)
        b = tl.load(b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None],
                    mask=in_k[:, None] & in_n[None, :], other=0.0)
        acc += dot(a, b, DOT_F32)
    if MUL_WEIGHT:
        acc *= tl.load(weights_ptr + pairs, mask=in_m, other=0.0).to(tl.float32)[:, None]
    tl.store(c_ptr + pairs[:, None] * stride_cm + offs_n[None, :],
             acc.to(c_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


def _grouped_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                  sorted_pairs: torch.Tensor, block_experts: torch.Tensor, num_pairs: int,
                  a_rows_per_pair: int, weights: torch.Tensor | None, block_m: int) -> None:
    n, k = b.shape[1], b.shape[2]
    block_n = min(64, max(16, triton.next_power_of_2(n)))
    block_k = min(64, max(16, triton.next_power_of_2(k)))
    grid = (block_experts.numel(), triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        a, b, out, weights if weights is not None else out, sorted_pairs, block_experts,
        num_pairs, a.stride(0), b.stride(0), b.stride(1), out.stride(0),
        N=n, K=k, A_ROWS_PER_PAIR=a_rows_per_pair, MUL_WEIGHT=weights is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_F32=dot_in_f32(a.dtype))


@triton.jit
def _grouped_quant_gemm_kernel(
    a_ptr, codes_ptr, scales_ptr, offsets_ptr, c_ptr, weights_ptr, sorted_pairs_ptr,
    block_experts_ptr, num_pairs, group,
    stride_am, stride_ce, stride_ck, stride_cn, stride_se, stride_sg, stride_cm,
    N: tl.constexpr, K: tl.constexpr, A_ROWS_PER_PAIR: tl.constexpr,
    MUL_WEIGHT: tl.constexpr, FMT: tl.constexpr, HAS_OFFSETS: tl.constexpr,
    PER_CHANNEL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
):
    """_grouped_gemm_kernel on quantized experts: the weight tiles through quant_dot."""
    block = tl.program_id(0)
    expert = tl.load(block_experts_ptr + block).to(tl.int64)
    if expert < 0:
        return
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + offs_m).to(tl.int64)
    in_m = pairs < num_pairs
    rows = pairs // A_ROWS_PER_PAIR
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    acc = quant_dot(a_ptr + rows[:, None] * stride_am, in_m, codes_ptr + expert * stride_ce,
                    scales_ptr + expert * stride_se, offsets_ptr + expert * stride_se,
                    offs_n, in_n, K, group, stride_ck, stride_cn, stride_sg, FMT, HAS_OFFSETS,
                    PER_CHANNEL, BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32)
    if MUL_WEIGHT:
        acc *= tl.load(weights_ptr + pairs, mask=in_m, other=0.0).to(tl.float32)[:, None]
    tl.store(c_ptr + pairs[:, None] * stride_cm + offs_n[None, :],
             acc.to(c_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


def _grouped_quant_gemm(a: torch.Tensor, b: QuantGemmWeight, out: torch.Tensor,
                        sorted_pairs: torch.Tensor, block_experts: torch.Tensor,
                        num_pairs: int, a_rows_per_pair: int, weights: torch.Tensor | None,
                        block_m: int) -> None:
    n = b.out_features
    block_n = min(64, max(16, triton.next_power_of_2(n)))
    offsets = b.offsets if b.offsets is not None else b.scales  # unread
    grid = (block_experts.numel(), triton.cdiv(n, block_n))
    _grouped_quant_gemm_kernel[grid](
        a, b.codes, b.scales, offsets, out, weights if weights is not None else out,
        sorted_pairs, block_experts, num_pairs, b.group, a.stride(0), b.codes.stride(0),
        b.codes.stride(1), b.codes.stride(2), b.scales.stride(0), b.scales.stride(1),
        out.stride(0), N=n, K=b.in_features, A_ROWS_PER_PAIR=a_rows_per_pair,
        MUL_WEIGHT=weights is not None, FMT=b.fmt, HAS_OFFSETS=b.offsets is not None,
        PER_CHANNEL=b.group == b.in_features, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=k_tile(b), DOT_F32=dot_in_f32(a.dtype))


def _expert_shape(name: str, weight: torch.Tensor | QuantGemmWeight, hidden: torch.Tensor
                  ) -> tuple[int, int, int]:
    """(experts, out features, in features) of a stacked float or quantized weight."""
    if isinstance(weight, QuantGemmWeight):
        if weight.codes.dim() != 3:
            raise ValueError(f"{name} must be experts stacked by quant_gemm.stack")
        check_tensor(f"{name}.codes", weight.codes, ndim=3, dtypes=(weight.codes.dtype,),
                     device=hidden.device)
        return weight.codes.shape[0], weight.out_features, weight.in_features
    check_tensor(name, weight, ndim=3, dtypes=(hidden.dtype,), device=hidden.device)
    return tuple(weight.shape)  # type: ignore[return-value]


def _grouped(a: torch.Tensor, b: torch.Tensor | QuantGemmWeight, *args) -> None:
    if isinstance(b, QuantGemmWeight):
        _grouped_quant_gemm(a, b, *args)
    else:
        _grouped_gemm(a, b, *args)


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor | QuantGemmWeight,
              w2: torch.Tensor | QuantGemmWeight, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, first_expert: int = 0, block_m: int = 16
              ) -> torch.Tensor:
    """hidden [T, H]; w13 [E, 2I, H]; w2 [E, H, I] (float in hidden's dtype, or quantized
    and stacked: quant_gemm.stack); topk_weights [T, k] (float32), topk_ids [T, k]
    (global ids; this rank holds experts first_expert .. + E) -> [T, H]: each token's sum
    over its local experts of weight * down(silu(gate) * up)."""
    check_launchable(hidden.device)
    device = hidden.device
    check_tensor("hidden", hidden, ndim=2, dtypes=MOE_DTYPES, device=device)
    check_tensor("topk_weights", topk_weights, ndim=2, device=device)
    check_tensor("topk_ids", topk_ids, ndim=2, device=device)
    num_experts, inter2, hidden_size = _expert_shape("w13", w13, hidden)
    w2_shape = _expert_shape("w2", w2, hidden)
    if (hidden.shape[1] != hidden_size or w2_shape != (num_experts, hidden_size, inter2 // 2)
            or topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != hidden.shape[0]):
        raise ValueError(f"shapes do not agree: hidden {tuple(hidden.shape)}, w13 "
                         f"{(num_experts, inter2, hidden_size)}, w2 {w2_shape}, topk_weights "
                         f"{tuple(topk_weights.shape)}, topk_ids {tuple(topk_ids.shape)}")
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    sorted_pairs, block_experts = align_tokens(topk_ids, num_experts, block_m, first_expert)
    gate_up = torch.empty(num_pairs, inter2, dtype=hidden.dtype, device=device)
    _grouped(hidden, w13, gate_up, sorted_pairs, block_experts, num_pairs, top_k, None,
             block_m)
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.silu(gate) * up
    # Pairs routed to other ranks' experts are never written: they stay zero.
    down = torch.zeros(num_pairs, hidden_size, dtype=hidden.dtype, device=device)
    _grouped(act, w2, down, sorted_pairs, block_experts, num_pairs, 1,
             topk_weights.flatten().contiguous(), block_m)
    return down.view(num_tokens, top_k, hidden_size).sum(dim=1)
