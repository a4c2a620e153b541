"""What the Triton kernels share: the paged-context loop and the launchers' checks.

A Triton kernel trusts its pointers and strides; a wrong dtype or a
transposed view does not crash it, it reads the wrong memory. So every
launcher checks what it is given and names the argument it rejects.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_tensor(name: str, tensor: torch.Tensor, *, ndim: int,
                 dtypes: tuple[torch.dtype, ...] | None = None,
                 device: torch.device | None = None, contiguous_last: bool = True) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if dtypes is not None and tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                         f"expected one of: {allowed}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, the other arguments on {device}")
    if contiguous_last and tensor.numel() and tensor.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, "
                         f"got strides {tensor.stride()}")


def check_kv_cache(key_cache: torch.Tensor, value_cache: torch.Tensor,
                   device: torch.device, dtype: torch.dtype) -> None:
    """key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim], same shape."""
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        check_tensor(name, cache, ndim=4, dtypes=(dtype,), device=device)
    if key_cache.shape != value_cache.shape:
        raise ValueError(f"key_cache {tuple(key_cache.shape)} and value_cache "
                         f"{tuple(value_cache.shape)} differ in shape")
    block_size = key_cache.shape[1]
    if block_size & (block_size - 1):
        raise ValueError(f"block_size (key_cache.shape[1]) must be a power of two, got {block_size}")


def check_attention_args(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor,
                         out: torch.Tensor | None) -> torch.Tensor:
    """What both attention launchers take; returns `out`, allocated if None.

    query: [num_tokens, num_heads, head_dim]; caches: [num_blocks, block_size,
    num_kv_heads, head_dim] of query's dtype; block_tables: [num_seqs,
    max_blocks] int32; seq_lens: [num_seqs] int32; out like query.
    """
    device = query.device
    check_tensor("query", query, ndim=3, dtypes=ATTENTION_DTYPES)
    check_kv_cache(key_cache, value_cache, device, query.dtype)
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,), device=device)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), device=device)
    _, num_heads, head_dim = query.shape
    num_kv_heads, cache_head_dim = key_cache.shape[2], key_cache.shape[3]
    if cache_head_dim != head_dim:
        raise ValueError(f"query head_dim {head_dim} != key_cache head_dim {cache_head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if block_tables.shape[0] != seq_lens.shape[0]:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for "
                         f"{seq_lens.shape[0]} seq_lens")
    if out is None:
        return torch.empty_like(query)
    check_tensor("out", out, ndim=3, dtypes=(query.dtype,), device=device)
    if out.shape != query.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(query.shape)}")
    return out


def check_launchable(device: torch.device) -> None:
    """Triton compiles for CUDA devices; on CPU it runs only in its interpreter."""
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"Triton kernels need a CUDA device, got tensors on {device}; "
                           "set TRITON_INTERPRET=1 before importing pagedserve to run them in "
                           "Triton's interpreter on CPU")


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
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale_log2,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Online softmax of q [BLOCK_M, HEAD_DIM_PAD] over context positions start .. end - 1.

    K/V of position n live at key_cache[table[n // BLOCK_SIZE], n % BLOCK_SIZE,
    kv_head]. With CAUSAL, row r sees only positions <= positions[r]; every row
    must see a position in the first tile, which keeps the running max finite.
    Returns (acc, m, l) in the exp2 domain: the output is acc / l[:, None],
    the log-sum-exp m + log2(l).
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
        scores = dot(q, tl.trans(k), DOT_F32) * scale_log2  # [BLOCK_M, BLOCK_N]
        if CAUSAL:
            visible = (offs_n[None, :] <= positions[:, None]) & n_mask[None, :]
        else:
            visible = n_mask[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(value_cache_ptr + blocks[:, None] * stride_vb + within[:, None] * stride_vt
                    + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_F32)
        m_i = m_new
    return acc, m_i, l_i


def kv_cache_strides(key_cache: torch.Tensor, value_cache: torch.Tensor) -> tuple[int, ...]:
    """(block, token, head) strides of the key cache, then of the value cache."""
    return (*key_cache.stride()[:3], *value_cache.stride()[:3])
