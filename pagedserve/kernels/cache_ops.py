"""Moving K/V in and between blocks: writes into slots, block copies, swaps.

The worker keeps its whole pool in one tensor, so one launch can copy a block
in every layer:

    kv_pool: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    kv_pool[layer, 0] is that layer's key_cache, kv_pool[layer, 1] its value_cache.

`copy_blocks` serves copy-on-write: a sequence about to write into a block it
shares gets its own copy first. (Swapping to the CPU pool is plain torch:
`swap.py`.)

An fp8 cache is handed to the kernels as its bytes: `write_kv_cache` divides
K and V by the layer's scale, saturates them and encodes them (fp8_codec.py,
which says why not with Triton's casts); `copy_blocks` copies bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.kernels.checks import (
    ATTENTION_DTYPES,
    check_block_mapping,
    check_kv_cache,
    check_launchable,
    check_pool,
    check_tensor,
)
from pagedserve.kernels.fp8_codec import encode_fp8
from pagedserve.kernels.kv_quant import fp8_format


@triton.jit
def _write_kv_cache_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
    k_scale, v_scale,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch,
    stride_vcb, stride_vct, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    FP8: tl.constexpr = None, FP8_MAX: tl.constexpr = None,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token)
    block = slot // BLOCK_SIZE
    within = slot % BLOCK_SIZE
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    num_heads = tl.where(slot >= 0, NUM_KV_HEADS, 0)  # a negative slot is padding: no heads
    mask = (offs_h < num_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
    key = tl.load(key_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :],
                  mask=mask)
    value = tl.load(value_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :],
                    mask=mask)
    if FP8 is not None:  # the caches are bytes: store the codes of x / scale, saturated
        key = encode_fp8(tl.clamp(key.to(tl.float32) / k_scale, -FP8_MAX, FP8_MAX), FP8)
        value = encode_fp8(tl.clamp(value.to(tl.float32) / v_scale, -FP8_MAX, FP8_MAX), FP8)
    tl.store(key_cache_ptr + block * stride_kcb + within * stride_kct
             + offs_h[:, None] * stride_kch + offs_d[None, :], key, mask=mask)
    tl.store(value_cache_ptr + block * stride_vcb + within * stride_vct
             + offs_h[:, None] * stride_vch + offs_d[None, :], value, mask=mask)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Scatter new K/V rows into their slots (`slot = block_id * block_size + offset`).

    key, value: [num_tokens, num_kv_heads, head_dim], any token and head
    strides (views into a fused QKV output are fine); slot_mapping:
    [num_tokens] int64, every slot distinct and inside the pool, or negative:
    a padding row (a CUDA graph's spare batch rows) that writes nothing.
    Caches of an fp8 dtype store clamp(x / scale) as kv_quant.quantize does.
    """
    device = key.device
    check_tensor("key", key, ndim=3, dtypes=ATTENTION_DTYPES)
    check_tensor("value", value, ndim=3, dtypes=(key.dtype,), device=device)
    check_kv_cache(key_cache, value_cache, device, key.dtype)
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64,), device=device)
    num_tokens, num_kv_heads, head_dim = key.shape
    if value.shape != key.shape:
        raise ValueError(f"value has shape {tuple(value.shape)}, key {tuple(key.shape)}")
    if key_cache.shape[2:] != key.shape[1:]:
        raise ValueError(f"key rows are [num_kv_heads, head_dim] = {list(key.shape[1:])}, the "
                         f"cache's {list(key_cache.shape[2:])}")
    if slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries "
                         f"for {num_tokens} tokens")
    check_launchable(device)
    if num_tokens == 0:
        return
    fp8 = fp8_format(key_cache.dtype)
    if fp8 is not None:
        key_cache, value_cache = key_cache.view(torch.uint8), value_cache.view(torch.uint8)
    _write_kv_cache_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=key_cache.shape[1], FP8=None if fp8 is None else fp8.name,
        FP8_MAX=None if fp8 is None else fp8.max, num_warps=1,
    )


@triton.jit
def _copy_blocks_kernel(pool_ptr, block_mapping_ptr, stride_cache, stride_block,
                        BLOCK_NUMEL: tl.constexpr, CHUNK: tl.constexpr):
    pair = tl.program_id(0)
    cache = tl.program_id(1).to(tl.int64)  # layer * 2 + (0 keys | 1 values)
    src = tl.load(block_mapping_ptr + 2 * pair).to(tl.int64)
    dst = tl.load(block_mapping_ptr + 2 * pair + 1).to(tl.int64)
    src_ptr = pool_ptr + cache * stride_cache + src * stride_block
    dst_ptr = pool_ptr + cache * stride_cache + dst * stride_block
    for start in range(0, BLOCK_NUMEL, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        mask = offs < BLOCK_NUMEL
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)


def copy_blocks(kv_pool: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """For each (src, dst) row of block_mapping, copy block src onto block dst in every layer.

    kv_pool: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim],
    contiguous; block_mapping: [num_pairs, 2] int64 on the pool's device. A
    block is never both a source and a destination in one call.
    """
    check_pool("kv_pool", kv_pool)
    check_block_mapping(block_mapping, kv_pool.device)
    check_launchable(kv_pool.device)
    if block_mapping.shape[0] == 0:
        return
    num_layers, _, _, block_size, num_kv_heads, head_dim = kv_pool.shape
    block_numel = block_size * num_kv_heads * head_dim
    if fp8_format(kv_pool.dtype) is not None:  # bytes are bytes
        kv_pool = kv_pool.view(torch.uint8)
    _copy_blocks_kernel[(block_mapping.shape[0], num_layers * 2)](
        kv_pool, block_mapping.contiguous(), kv_pool.stride(1), kv_pool.stride(2),
        BLOCK_NUMEL=block_numel, CHUNK=min(4096, triton.next_power_of_2(block_numel)),
        num_warps=4,
    )
