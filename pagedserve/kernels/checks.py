"""Argument checks for the kernel launchers (plain torch, no Triton import).

A Triton kernel trusts its pointers and strides; a wrong dtype or a
transposed view does not crash it, it reads the wrong memory. So every
launcher checks what it is given and names the argument it rejects.
"""

from __future__ import annotations

import os

import torch

from pagedserve.kernels.kv_quant import FP8_FORMATS

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# What a KV cache may hold besides the query's dtype (kv_quant.py).
FP8_DTYPES = tuple(FP8_FORMATS)


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
    """key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim], same shape,
    both of `dtype` (the query's) or both of one fp8 dtype."""
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        check_tensor(name, cache, ndim=4, dtypes=(dtype, *FP8_DTYPES), device=device)
    if key_cache.shape != value_cache.shape:
        raise ValueError(f"key_cache {tuple(key_cache.shape)} and value_cache "
                         f"{tuple(value_cache.shape)} differ in shape")
    if key_cache.dtype != value_cache.dtype:
        raise ValueError(f"key_cache is {key_cache.dtype}, value_cache {value_cache.dtype}")
    block_size = key_cache.shape[1]
    if block_size & (block_size - 1):
        raise ValueError("block_size (key_cache.shape[1]) must be a power of two, "
                         f"got {block_size}")


def check_attention_args(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor,
                         out: torch.Tensor | None) -> torch.Tensor:
    """What both attention launchers take; returns `out`, allocated if None.

    query: [num_tokens, num_heads, head_dim]; caches: [num_blocks, block_size,
    num_kv_heads, head_dim] of query's dtype or fp8; block_tables: [num_seqs,
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


def check_pool(name: str, pool: torch.Tensor) -> None:
    """pool: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], contiguous."""
    check_tensor(name, pool, ndim=6, dtypes=ATTENTION_DTYPES + FP8_DTYPES)
    if not pool.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {pool.stride()}")
    if pool.shape[1] != 2:
        raise ValueError(f"{name} must be [num_layers, 2, num_blocks, block_size, num_kv_heads, "
                         f"head_dim], got shape {tuple(pool.shape)}")


def check_block_mapping(block_mapping: torch.Tensor, device: torch.device) -> None:
    """block_mapping: [num_pairs, 2] int64, (source block, destination block) rows."""
    check_tensor("block_mapping", block_mapping, ndim=2, dtypes=(torch.int64,), device=device)
    if block_mapping.shape[1] != 2:
        raise ValueError(f"block_mapping must be [num_pairs, 2] (src, dst), got shape "
                         f"{tuple(block_mapping.shape)}")
