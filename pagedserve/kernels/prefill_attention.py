"""Paged prefill attention: variable-length query chunks over their paged context.

Sequence i owns query rows cu_seqlens_q[i] : cu_seqlens_q[i+1]. Those are its
last q_len context positions, so with prefix = seq_len - q_len, query j sits
at position prefix + j and attends to positions 0 .. prefix + j. One rule
covers a whole prompt (prefix 0), a chunk of a long prompt (prefix = what
earlier steps computed) and a prompt whose prefix blocks came from the cache.

One program serves BLOCK_Q consecutive query tokens of one sequence and all
GROUP query heads that share one KV head, stacked as rows of one matrix:

    row r  ->  token BLOCK_Q * q_block + r // GROUP_PAD,  head kv_head * GROUP + r % GROUP_PAD

so each K/V tile is loaded once for the whole group. The loop over context
tiles stops at the block's last query position (causal), and reads K/V
through the block table exactly like the decode kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.kernels.checks import check_attention_args, check_launchable, check_tensor
from pagedserve.kernels.common import (
    attend_paged_context,
    dot_in_f32,
    kv_cache_strides,
    kv_scale_args,
)


@triton.jit
def _paged_prefill_kernel(
    # pointers
    query_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, seq_lens_ptr,
    cu_seqlens_q_ptr, out_ptr,
    # sizes
    scale_log2, v_scale,
    # strides
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    # meta-parameters
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr, WINDOW: tl.constexpr, FP8: tl.constexpr,
):
    q_block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    offs_m = tl.arange(0, BLOCK_M)
    token = q_block * BLOCK_Q + offs_m // GROUP_PAD
    in_group = offs_m % GROUP_PAD
    heads = kv_head * GROUP + in_group
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    row_mask = (token < q_len) & (in_group < GROUP)
    rows = (q_start + token).to(tl.int64)
    q = tl.load(query_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh
                + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    positions = prefix + token  # [BLOCK_M]; padding rows lie past the end and are not stored

    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_end = tl.minimum(seq_len, prefix + (q_block + 1) * BLOCK_Q)  # causal: nothing past the block
    kv_start = 0
    if WINDOW > 0:  # nothing before the first row's window
        kv_start = tl.maximum(prefix + q_block * BLOCK_Q + 1 - WINDOW, 0)
    acc, m_i, l_i = attend_paged_context(
        q, positions, kv_start, kv_end, table, key_cache_ptr, value_cache_ptr, kv_head,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale_log2, v_scale,
        BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N, True, DOT_F32, WINDOW, FP8)

    out = acc / l_i[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def paged_prefill_attention(query: torch.Tensor, key_cache: torch.Tensor,
                            value_cache: torch.Tensor, block_tables: torch.Tensor,
                            seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, scale: float, *,
                            max_query_len: int, out: torch.Tensor | None = None,
                            block_q: int | None = None, block_n: int | None = None,
                            window: int | None = None, k_scale: float = 1.0,
                            v_scale: float = 1.0) -> torch.Tensor:
    """Causal attention of each sequence's query chunk over its paged context (with a
    sliding `window`, the last `window` positions each query sees).

    query: [num_tokens, num_heads, head_dim]; cu_seqlens_q: [num_seqs + 1]
    int32, starting at 0 and ending at num_tokens; seq_lens: [num_seqs] int32,
    each at least its query length; block_tables: [num_seqs, max_blocks]
    int32. `max_query_len` bounds the grid. Returns `out`
    ([num_tokens, num_heads, head_dim], query's dtype), allocated if not given.
    Caches of an fp8 dtype are read times `k_scale` and `v_scale`.
    """
    device = query.device
    out = check_attention_args(query, key_cache, value_cache, block_tables, seq_lens, out)
    check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=(torch.int32,), device=device)
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    num_seqs = seq_lens.shape[0]
    if cu_seqlens_q.shape[0] != num_seqs + 1:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries; expected "
                         f"{num_seqs + 1} for {num_seqs} sequences")
    if max_query_len < 1:
        raise ValueError(f"max_query_len must be at least 1, got {max_query_len}")
    check_launchable(device)
    if num_seqs == 0 or num_tokens == 0:
        return out

    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    # About 64 rows per program: enough for the tensor cores, small enough for registers.
    block_q = block_q or max(1, 64 // group_pad)
    block_n = block_n or (64 if head_dim_pad <= 64 else 32)
    if block_q * group_pad < 16:
        raise ValueError(f"block_q={block_q} gives {block_q * group_pad} rows per program; "
                         "tensor cores need at least 16")
    grid = (triton.cdiv(max_query_len, block_q), num_seqs, num_kv_heads)
    key_cache, value_cache, scale_log2, v_scale, fp8 = kv_scale_args(
        key_cache, value_cache, scale, k_scale, v_scale)
    _paged_prefill_kernel[grid](
        query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, out,
        scale_log2, v_scale,
        query.stride(0), query.stride(1),
        *kv_cache_strides(key_cache, value_cache),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size, BLOCK_Q=block_q, BLOCK_N=block_n,
        DOT_F32=dot_in_f32(query.dtype), WINDOW=window or 0, FP8=fp8,
        num_warps=4, num_stages=2,
    )
    return out
