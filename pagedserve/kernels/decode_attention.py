"""Paged decode attention: one query token per sequence, K/V read through the block table.

One program serves one (sequence, KV head) pair and all the query heads that
share that KV head (GQA), so each K/V byte is loaded once per step:

    program (seq, kv_head, split)
      q     [GROUP, D]           the GROUP query heads of kv_head
      for each tile of BLOCK_N context positions in this split:
        block = block_table[seq, pos // block_size]     scattered blocks
        k, v  [BLOCK_N, D]       key_cache[block, pos % block_size, kv_head]
        online softmax: running max m, running sum l, accumulator acc [GROUP, D]

Decoding is memory bound: the work is reading the context. When the batch
has too few (sequence, KV head) pairs to occupy every multiprocessor, the
context is split across programs (flash-decoding). Each split writes its
normalised partial output and its log-sum-exp; `_reduce_splits_kernel`
combines them:

    out = sum_s exp2(lse_s - max lse) * out_s / sum_s exp2(lse_s - max lse)

Each sequence divides its own context among the splits, in the kernel. So the
launch depends on the batch size and the split count only, not on the
lengths: a CUDA graph captured once replays for any lengths up to the width
of its block tables.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pagedserve.kernels.checks import check_attention_args, check_launchable
from pagedserve.kernels.common import (
    attend_paged_context,
    dot_in_f32,
    kv_cache_strides,
    kv_scale_args,
)

MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 32


@triton.jit
def _paged_decode_kernel(
    # pointers
    query_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, partial_out_ptr, partial_lse_ptr,
    # sizes
    scale_log2, v_scale,
    # strides
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    stride_pt, stride_ph, stride_ps,
    # meta-parameters
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, DOT_F32: tl.constexpr, WINDOW: tl.constexpr, FP8: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    # With a sliding window the token sees its last WINDOW positions only.
    first = 0
    if WINDOW > 0:
        first = tl.maximum(seq_len - WINDOW, 0)
    # Each sequence splits what it sees into whole tiles; splits past its end are empty.
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len - first, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    start = first + split * tokens_per_split
    end = tl.minimum(seq_len, start + tokens_per_split)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(query_ptr + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh
                + offs_d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    acc, m_i, l_i = attend_paged_context(
        q, offs_g, start, end, table, key_cache_ptr, value_cache_ptr, kv_head,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale_log2, v_scale,
        GROUP_PAD, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N, False, DOT_F32, 0, FP8)

    out_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        # An empty split (past a short sequence's end) has l = 0: weight 0 in the reduce.
        has_any = l_i > 0
        part = acc / tl.where(has_any, l_i, 1.0)[:, None]
        lse = tl.where(has_any, m_i + tl.log2(tl.where(has_any, l_i, 1.0)), float("-inf"))
        base = seq.to(tl.int64) * stride_pt + heads * stride_ph + split * stride_ps
        tl.store(partial_out_ptr + base[:, None] * HEAD_DIM_PAD + offs_d[None, :], part,
                 mask=out_mask)
        tl.store(partial_lse_ptr + base, lse, mask=g_mask)
    else:
        out = acc / l_i[:, None]
        tl.store(out_ptr + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh
                 + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _reduce_splits_kernel(
    partial_out_ptr, partial_lse_ptr, out_ptr,
    num_splits,
    stride_pt, stride_ph, stride_ps,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    s_mask = offs_s < num_splits
    base = seq.to(tl.int64) * stride_pt + head * stride_ph + offs_s * stride_ps
    lse = tl.load(partial_lse_ptr + base, mask=s_mask, other=float("-inf"))
    weights = tl.exp2(lse - tl.max(lse, 0))  # split 0 always holds context: max is finite
    weights = weights / tl.sum(weights, 0)
    parts = tl.load(partial_out_ptr + base[:, None] * HEAD_DIM_PAD + offs_d[None, :],
                    mask=s_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(parts * weights[:, None], 0)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """How many programs share one sequence's context.

    One program per (sequence, KV head) is enough once those pairs fill every
    multiprocessor; below that, split the context so about two waves of
    programs run, but keep each split at least MIN_TOKENS_PER_SPLIT long so
    the reduce stays cheap next to the reading.
    """
    programs = num_seqs * num_kv_heads
    if programs == 0 or programs >= num_sms:  # no decodes in the step, or enough programs
        return 1
    wanted = math.ceil(2 * num_sms / programs)
    worthwhile = math.ceil(max_seq_len / MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, worthwhile, MAX_SPLITS))


def default_num_splits(device: torch.device, num_seqs: int, num_kv_heads: int,
                       max_seq_len: int) -> int:
    """`choose_num_splits` for this device; 1 off CUDA, where programs run one after another."""
    if device.type != "cuda":
        return 1
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    return choose_num_splits(num_seqs, num_kv_heads, max_seq_len, num_sms)


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, *,
                           max_seq_len: int, num_splits: int | None = None,
                           out: torch.Tensor | None = None, block_n: int | None = None,
                           window: int | None = None, k_scale: float = 1.0,
                           v_scale: float = 1.0) -> torch.Tensor:
    """Attention of one query token per sequence over its whole paged context (with a
    sliding `window`, its last `window` positions).

    query: [num_seqs, num_heads, head_dim]; key_cache, value_cache:
    [num_blocks, block_size, num_kv_heads, head_dim]; block_tables:
    [num_seqs, max_blocks] int32; seq_lens: [num_seqs] int32, each in
    1..max_seq_len (the query's own position included). Returns `out`
    ([num_seqs, num_heads, head_dim], query's dtype), allocated if not given.
    `num_splits=None` picks the split count for the device. Caches of an fp8 dtype
    are read times `k_scale` and `v_scale`.
    """
    device = query.device
    out = check_attention_args(query, key_cache, value_cache, block_tables, seq_lens, out)
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    if seq_lens.shape[0] != num_seqs:
        raise ValueError(f"seq_lens has {seq_lens.shape[0]} entries for {num_seqs} queries")
    if block_tables.shape[1] * block_size < max_seq_len:
        raise ValueError(f"block_tables has {block_tables.shape[1]} columns of {block_size} "
                         f"tokens, fewer than max_seq_len={max_seq_len}")
    check_launchable(device)
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(device, num_seqs, num_kv_heads, max_seq_len)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits={num_splits} must be between 1 and {MAX_SPLITS}")

    group = num_heads // num_kv_heads
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    # Tensor cores need 16 rows; the spare rows of a small group cost no memory traffic.
    group_pad = max(16, triton.next_power_of_2(group))
    block_n = block_n or (64 if head_dim_pad <= 128 else 32)
    split = num_splits > 1
    if split:
        # partial_out: [num_seqs, num_heads, num_splits, head_dim_pad]; partial_lse without
        # the last.
        partial_out = torch.empty(num_seqs, num_heads, num_splits, head_dim_pad,
                                  dtype=torch.float32, device=device)
        partial_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32,
                                  device=device)
    else:
        partial_out = partial_lse = out  # unused
    p_strides = (num_heads * num_splits, num_splits, 1)
    key_cache, value_cache, scale_log2, v_scale, fp8 = kv_scale_args(
        key_cache, value_cache, scale, k_scale, v_scale)
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, key_cache, value_cache, block_tables, seq_lens,
        out, partial_out, partial_lse,
        scale_log2, v_scale,
        query.stride(0), query.stride(1),
        *kv_cache_strides(key_cache, value_cache),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        *p_strides,
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, SPLIT=split,
        DOT_F32=dot_in_f32(query.dtype), WINDOW=window or 0, FP8=fp8,
        num_warps=4, num_stages=2,
    )
    if split:
        _reduce_splits_kernel[(num_seqs, num_heads)](
            partial_out, partial_lse, out, num_splits,
            *p_strides, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
            SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4,
        )
    return out
