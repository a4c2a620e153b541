"""What the Triton attention kernels share: the paged-context loop and a dot helper."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pagedserve.kernels.checks import interpreting
from pagedserve.kernels.fp8_codec import decode_fp8
from pagedserve.kernels.kv_quant import fp8_format


@triton.jit
def dot(a, b, DOT_F32: tl.constexpr):
    """tl.dot, or the same product in float32 when DOT_F32.

    Triton's interpreter multiplies bfloat16 operands as raw bits, so under
    TRITON_INTERPRET the launchers upcast; that is exact (a bf16 x bf16
    product is exact in fp32), so results match the compiled kernel. float32
    inputs also take this path, so they are not rounded to tf32.
    """
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


def dot_in_f32(dtype: torch.dtype) -> bool:
    return interpreting() or dtype == torch.float32


@triton.jit
def attend_paged_context(
    q, positions, start, end, table, key_cache_ptr, value_cache_ptr, kv_head,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale_log2, v_scale,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_F32: tl.constexpr, WINDOW: tl.constexpr = 0, FP8: tl.constexpr = None,
):
    """Online softmax of q [BLOCK_M, HEAD_DIM_PAD] over context positions start .. end - 1.

    K/V of position n live at key_cache[table[n // BLOCK_SIZE], n % BLOCK_SIZE,
    kv_head]. With CAUSAL, row r sees only positions <= positions[r], and with a
    sliding WINDOW (> 0) only those > positions[r] - WINDOW. Without a window every
    row must see a position in the first tile, which keeps the running max finite;
    with one, a row may see none in a tile, and the update keeps it finite.
    Returns (acc, m, l) in the exp2 domain: the output is acc / l[:, None],
    the log-sum-exp m + log2(l).

    With FP8 (fp8_codec's format name) the caches are fp8 codes, decoded to q's
    dtype: the key scale is in `scale_log2` (kv_scale_args), the value scale
    multiplies `acc` at the end. Without, `v_scale` is unused.
    """
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    for tile in range(start, end, BLOCK_N):
        offs_n = tile + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        blocks = tl.load(table + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        within = offs_n % BLOCK_SIZE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(key_cache_ptr + blocks[:, None] * stride_kb + within[:, None] * stride_kt
                    + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        if FP8 is not None:
            k = decode_fp8(k, FP8).to(q.dtype)
        scores = dot(q, tl.trans(k), DOT_F32) * scale_log2  # [BLOCK_M, BLOCK_N]
        if CAUSAL:
            visible = (offs_n[None, :] <= positions[:, None]) & n_mask[None, :]
            if WINDOW > 0:
                visible &= offs_n[None, :] > positions[:, None] - WINDOW
        else:
            visible = n_mask[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        if WINDOW > 0:  # a row that has seen nothing yet: subtract 0, not -inf
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(value_cache_ptr + blocks[:, None] * stride_vb + within[:, None] * stride_vt
                    + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        if FP8 is not None:
            v = decode_fp8(v, FP8).to(q.dtype)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_F32)
        m_i = m_new
    if FP8 is not None:
        acc = acc * v_scale
    return acc, m_i, l_i


def kv_cache_strides(key_cache: torch.Tensor, value_cache: torch.Tensor) -> tuple[int, ...]:
    """(block, token, head) strides of the key cache, then of the value cache."""
    return (*key_cache.stride()[:3], *value_cache.stride()[:3])


def kv_scale_args(key_cache: torch.Tensor, value_cache: torch.Tensor, scale: float,
                  k_scale: float, v_scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor, float, float, str | None]:
    """What a launcher hands `attend_paged_context` for its caches: (key cache, value
    cache, scale_log2, v_scale, FP8). An fp8 cache goes as its bytes, with the key
    scale folded into the softmax scale; a float cache as it is, scales unused."""
    fp8 = fp8_format(key_cache.dtype)
    if fp8 is None:
        return key_cache, value_cache, scale * math.log2(math.e), 1.0, None
    return (key_cache.view(torch.uint8), value_cache.view(torch.uint8),
            scale * k_scale * math.log2(math.e), v_scale, fp8.name)
