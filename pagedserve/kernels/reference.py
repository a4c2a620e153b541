"""Pure-torch paged attention: the CPU path and the oracle for the Triton kernels.

KV layout, per layer, keys and values separate:

    key_cache: [num_blocks, block_size, num_kv_heads, head_dim]

A token's slot is `block_id * block_size + offset`, so viewing the cache as
`[num_blocks * block_size, num_kv_heads, head_dim]` turns a slot into a row.
A batch is a flat list of query tokens, sequence by sequence:

    query:            [num_tokens, num_heads, head_dim]
    query_start_loc:  [num_seqs + 1]   sequence i owns query rows qsl[i]:qsl[i+1]
    seq_lens:         [num_seqs]       its context length, these new tokens included
    block_tables:     [num_seqs, max_blocks_per_seq]  (rows padded past the context)

The queries of sequence i are its last `q_len` context positions, and attend
causally: query j sees context positions 0 .. seq_len - q_len + j. That one
rule covers a whole prompt, a prompt chunk over its cached prefix, and a
decode token.
"""

from __future__ import annotations

import torch


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V rows into their slots.

    key, value: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens] int64.
    """
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def context_slots(block_table: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """Slots of context positions 0..seq_len-1 for one sequence: [seq_len] int64."""
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].to(torch.int64)
    offsets = torch.arange(block_size, device=block_table.device)
    return (blocks[:, None] * block_size + offsets).flatten()[:seq_len]


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float,
                    slots: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention of each sequence's queries over its paged context.

    `slots` may carry each sequence's `context_slots(...)`, computed once per
    step, so the layers of a model do not each recompute them.
    Returns [num_tokens, num_heads, head_dim] in the query's dtype.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads, block_size = key_cache.shape[2], key_cache.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    flat_k = key_cache.view(-1, num_kv_heads, head_dim)
    flat_v = value_cache.view(-1, num_kv_heads, head_dim)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    out = torch.empty_like(query)
    for i, seq_len in enumerate(lens):
        q_start, q_end = starts[i], starts[i + 1]
        q_len = q_end - q_start
        idx = slots[i] if slots is not None else context_slots(block_tables[i], seq_len, block_size)
        q = query[q_start:q_end].transpose(0, 1)  # [H, q_len, D]
        k = flat_k.index_select(0, idx).transpose(0, 1)  # [H_kv, seq_len, D]
        v = flat_v.index_select(0, idx).transpose(0, 1)
        out[q_start:q_end] = _attend(q, k, v, seq_len - q_len, scale).transpose(0, 1)
    return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int,
            scale: float) -> torch.Tensor:
    """q: [H, q_len, D]; k, v: [H_kv, prefix_len + q_len, D] -> [H, q_len, D].

    Plain matmul-softmax-matmul: on CPUs it beats SDPA's fused kernel for
    these shapes (about 2x for a decode token). The query heads that share a
    KV head are stacked into one matrix, so K/V are never repeated for GQA.
    """
    num_heads, q_len, head_dim = q.shape
    num_kv_heads, seq_len = k.shape[0], k.shape[1]
    group = num_heads // num_kv_heads
    if q_len == 1:  # a decode token sees its whole context: no mask, no chunks
        scores = torch.matmul(q.view(num_kv_heads, group, head_dim), k.transpose(1, 2))
        probs = (scores.float() * scale).softmax(dim=-1).to(v.dtype)  # [H_kv, group, S]
        return torch.matmul(probs, v).view(num_heads, 1, head_dim)
    out = torch.empty_like(q)
    # Bound the score matrix ([H, rows, seq_len] float32) to ~64 MiB.
    rows_per_chunk = max(1, (16 << 20) // (num_heads * seq_len))
    for start in range(0, q_len, rows_per_chunk):
        end = min(q_len, start + rows_per_chunk)
        q_chunk = q[:, start:end].reshape(num_kv_heads, group * (end - start), head_dim)
        scores = torch.matmul(q_chunk, k.transpose(1, 2)).float() * scale  # [H_kv, group*rows, S]
        if end - start > 1 or prefix_len + start + 1 < seq_len:
            rows = torch.arange(start, end, device=q.device)[:, None] + prefix_len
            allowed = torch.arange(seq_len, device=q.device)[None, :] <= rows  # [rows, S]
            scores = scores.view(num_kv_heads, group, end - start, seq_len)
            scores = scores.masked_fill(~allowed, float("-inf")).view(num_kv_heads, -1, seq_len)
        probs = scores.softmax(dim=-1).to(v.dtype)
        out[:, start:end] = torch.matmul(probs, v).view(num_heads, end - start, head_dim)
    return out
