"""Random paged-attention batches and the dense attention they must equal."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch


def dense_attention(q, k, v, scale, window=None):
    """q: [q_len, H, D]; k, v: [S, H_kv, D]; the queries are the last q_len positions, and
    with a sliding window each sees its last `window` positions (transformers' rule).

    Computed in float64 from whatever dtype the inputs are stored in.
    """
    q_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,shd->hqs", q.double(), k.double()) * scale
    rows = torch.arange(q_len)[:, None] + seq_len - q_len
    allowed = torch.arange(seq_len)[None, :] <= rows
    if window is not None:
        allowed &= torch.arange(seq_len)[None, :] > rows - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqs,shd->qhd", scores.softmax(-1), v.double())


@dataclass
class PagedBatch:
    """Sequences whose contexts sit in scattered blocks of one pool.

    query:           [num_tokens, H, D], sequence by sequence
    key/value_cache: [num_blocks, block_size, H_kv, D]
    block_tables:    [num_seqs, max_blocks] int32, padded with block 0
    seq_lens:        [num_seqs] int32; query_start_loc: [num_seqs + 1] int32
    """

    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    slot_mapping: torch.Tensor  # [num_tokens] int64, slots of the query tokens
    contexts: list[tuple[torch.Tensor, torch.Tensor]]  # per sequence, K/V [seq_len, H_kv, D]
    queries: list[torch.Tensor]
    scale: float

    def expected(self, window: int | None = None) -> torch.Tensor:
        """[num_tokens, H, D] float64."""
        return torch.cat([dense_attention(q, k, v, self.scale, window)
                          for q, (k, v) in zip(self.queries, self.contexts, strict=True)])


def make_paged_batch(seqs: list[tuple[int, int]], *, block_size: int, num_heads: int,
                     num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32,
                     seed: int = 0, spare_blocks: int = 5, poison_unused: bool = False
                     ) -> PagedBatch:
    """seqs: (context length, query length) per sequence.

    Each sequence's blocks are drawn from a shuffled pool, so they are
    neither contiguous nor in order. With `poison_unused`, every slot outside
    all contexts holds NaN: a kernel that reads past a context's end, or a
    block not in its table, produces NaN.
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(math.ceil(s / block_size) for s, _ in seqs) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    fill = float("nan") if poison_unused else 0.0
    key_cache = torch.full(shape, fill, dtype=dtype)
    value_cache = torch.full(shape, fill, dtype=dtype)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, contexts, queries, slot_mapping = [], [], [], []
    for seq_len, q_len in seqs:
        table = [free.pop() for _ in range(math.ceil(seq_len / block_size))]
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size
                              for p in range(seq_len)])
        key_cache.view(-1, num_kv_heads, head_dim)[slots] = k
        value_cache.view(-1, num_kv_heads, head_dim)[slots] = v
        tables.append(table)
        contexts.append((k, v))
        queries.append(torch.randn(q_len, num_heads, head_dim, generator=gen).to(dtype))
        slot_mapping.append(slots[seq_len - q_len:])
    width = max(len(t) for t in tables)
    return PagedBatch(
        query=torch.cat(queries),
        key_cache=key_cache,
        value_cache=value_cache,
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        seq_lens=torch.tensor([s for s, _ in seqs], dtype=torch.int32),
        query_start_loc=torch.tensor([0] + [q for _, q in seqs]).cumsum(0).to(torch.int32),
        slot_mapping=torch.cat(slot_mapping),
        contexts=contexts,
        queries=queries,
        scale=head_dim ** -0.5,
    )


def poison_before_windows(batch: PagedBatch, seqs: list[tuple[int, int]], window: int) -> None:
    """NaN in K and V at every position no query of its sequence sees under `window`: a
    kernel that reads one (or a block holding only such positions) produces NaN."""
    block_size = batch.key_cache.shape[1]
    for (seq_len, q_len), table in zip(seqs, batch.block_tables.tolist(), strict=True):
        for position in range(max(0, seq_len - q_len + 1 - window)):
            block, offset = table[position // block_size], position % block_size
            batch.key_cache[block, offset] = float("nan")
            batch.value_cache[block, offset] = float("nan")
