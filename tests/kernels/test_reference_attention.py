"""The torch paged attention against plain dense attention on contiguous K/V."""

from __future__ import annotations

import pytest
import torch
from support.paged_batch import make_paged_batch

from pagedserve.kernels.reference import paged_attention

# (context length, query length): decode tokens of scattered lengths, whole
# prompts, and prompt chunks over a cached prefix.
SEQS = [(1, 1), (5, 1), (17, 1), (33, 1), (34, 1), (200, 1), (7, 7), (40, 13), (64, 64), (31, 2)]


@pytest.mark.parametrize("block_size", [1, 8, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (8, 1)])
def test_matches_dense_attention(block_size, num_heads, num_kv_heads):
    batch = make_paged_batch(SEQS, block_size=block_size, num_heads=num_heads,
                             num_kv_heads=num_kv_heads, head_dim=16,
                             seed=block_size * 100 + num_heads * 10 + num_kv_heads)

    out = paged_attention(batch.query, batch.key_cache, batch.value_cache, batch.block_tables,
                          batch.seq_lens, batch.query_start_loc, batch.scale)

    torch.testing.assert_close(out, batch.expected().float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 4, 16, 50])
def test_a_sliding_window_sees_the_last_positions_only(window):
    batch = make_paged_batch(SEQS, block_size=8, num_heads=8, num_kv_heads=2, head_dim=16,
                             seed=window)
    out = paged_attention(batch.query, batch.key_cache, batch.value_cache, batch.block_tables,
                          batch.seq_lens, batch.query_start_loc, batch.scale, window=window)
    torch.testing.assert_close(out, batch.expected(window).float(), atol=1e-5, rtol=1e-5)
