"""The torch paged attention against plain dense attention on contiguous K/V."""

from __future__ import annotations

import math
import random

import pytest
import torch

from pagedserve.kernels.reference import paged_attention, write_kv_cache


def dense_attention(q, k, v, scale):
    """q: [q_len, H, D]; k, v: [S, H_kv, D]; the queries are the last q_len positions."""
    q_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,shd->hqs", q.double(), k.double()) * scale
    allowed = torch.arange(seq_len)[None, :] <= torch.arange(q_len)[:, None] + seq_len - q_len
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqs,shd->qhd", scores.softmax(-1), v.double())


@pytest.mark.parametrize("block_size", [1, 8, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (8, 1)])
def test_matches_dense_attention(block_size, num_heads, num_kv_heads):
    rng = random.Random(block_size * 100 + num_heads * 10 + num_kv_heads)
    torch.manual_seed(rng.randrange(1 << 30))
    head_dim = 16
    # (context length, query length): decode tokens of scattered lengths, whole
    # prompts, and prompt chunks over a cached prefix.
    seqs = [(1, 1), (5, 1), (17, 1), (33, 1), (34, 1), (200, 1), (7, 7), (40, 13), (64, 64), (31, 2)]
    num_blocks = sum(math.ceil(s / block_size) for s, _ in seqs) + 5
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    value_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    free = list(range(num_blocks))
    rng.shuffle(free)  # blocks of a sequence are scattered over the pool
    tables, contexts, queries = [], [], []
    for seq_len, q_len in seqs:
        table = [free.pop() for _ in range(math.ceil(seq_len / block_size))]
        k = torch.randn(seq_len, num_kv_heads, head_dim)
        v = torch.randn(seq_len, num_kv_heads, head_dim)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size
                              for p in range(seq_len)])
        write_kv_cache(k, v, key_cache, value_cache, slots)
        tables.append(table)
        contexts.append((k, v))
        queries.append(torch.randn(q_len, num_heads, head_dim))
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    query_start_loc = torch.tensor([0] + [q for _, q in seqs], dtype=torch.int32).cumsum(0)
    seq_lens = torch.tensor([s for s, _ in seqs], dtype=torch.int32)
    scale = head_dim ** -0.5

    out = paged_attention(torch.cat(queries), key_cache, value_cache, block_tables, seq_lens,
                          query_start_loc, scale)

    expected = torch.cat([dense_attention(q, k, v, scale)
                          for q, (k, v) in zip(queries, contexts)]).float()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
