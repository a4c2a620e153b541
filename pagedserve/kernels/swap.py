"""Moving blocks between the device pool and the CPU pool: plain torch copies.

Both pools have the worker's layout, [num_layers, 2, num_blocks, block_size,
num_kv_heads, head_dim], so a block moves in every layer with one gather, one
transfer and one scatter. An fp8 pool moves as its bytes (`.view(torch.uint8)`):
torch has no `index_copy_` for fp8 on the CPU.
"""

from __future__ import annotations

import torch

from pagedserve.kernels.checks import check_block_mapping, check_pool
from pagedserve.kernels.kv_quant import fp8_format


def swap_blocks(src_pool: torch.Tensor, dst_pool: torch.Tensor,
                block_mapping: torch.Tensor) -> None:
    """Copy block src of src_pool onto block dst of dst_pool, for each (src, dst) row.

    block_mapping: [num_pairs, 2] int64 on the CPU.
    """
    check_pool("src_pool", src_pool)
    check_pool("dst_pool", dst_pool)
    check_block_mapping(block_mapping, torch.device("cpu"))
    if src_pool.shape[:2] != dst_pool.shape[:2] or src_pool.shape[3:] != dst_pool.shape[3:]:
        raise ValueError(f"src_pool {tuple(src_pool.shape)} and dst_pool {tuple(dst_pool.shape)} "
                         "differ in layout")
    if src_pool.dtype != dst_pool.dtype:
        raise ValueError(f"src_pool is {src_pool.dtype}, dst_pool {dst_pool.dtype}")
    if block_mapping.shape[0] == 0:
        return
    if fp8_format(src_pool.dtype) is not None:
        src_pool, dst_pool = src_pool.view(torch.uint8), dst_pool.view(torch.uint8)
    src = block_mapping[:, 0].to(src_pool.device)
    dst = block_mapping[:, 1].to(dst_pool.device)
    dst_pool.index_copy_(2, dst, src_pool.index_select(2, src).to(dst_pool.device))
