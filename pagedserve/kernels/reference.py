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
decode token. A layer with a sliding `window` W sees only the last W of
those: the query at position p sees positions p - W + 1 .. p (transformers'
rule, `kv_idx > q_idx - sliding_window`).

An fp8 cache (kv_quant.py) is written quantized, with the layer's `k_scale` and
`v_scale`, and read back as the query's dtype: the gathered rows are
dequantized, never the whole cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch

from pagedserve.kernels.kv_quant import dequantize, fp8_format, quantize


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Scatter new K/V rows into their slots; into an fp8 cache quantized by the scales.

    key, value: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens] int64.
    A negative slot is a padding row: it writes nothing.
    """
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    if fp8_format(key_cache.dtype) is not None:  # no fp8 index_copy_ on the CPU: as bytes
        key = quantize(key, k_scale, key_cache.dtype).view(torch.uint8)
        value = quantize(value, v_scale, value_cache.dtype).view(torch.uint8)
        key_cache, value_cache = key_cache.view(torch.uint8), value_cache.view(torch.uint8)
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def copy_blocks(kv_pool: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """Copy block src onto block dst in every layer, for each (src, dst) row.

    kv_pool: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim];
    block_mapping: [num_pairs, 2] int64. Bytes are copied as they are (an fp8 pool as uint8).
    """
    if fp8_format(kv_pool.dtype) is not None:
        kv_pool = kv_pool.view(torch.uint8)
    blocks = kv_pool.index_select(2, block_mapping[:, 0])
    kv_pool.index_copy_(2, block_mapping[:, 1], blocks)


@dataclass
class DecodeBucket:
    """Decode tokens of similar context length, attended in one batched matmul."""

    rows: torch.Tensor  # [n] int64, their query rows
    # [n, num_kv_heads, max_len] int64: rows of the cache viewed as [slots * num_kv_heads,
    # head_dim], so one gather yields K already in [n, H_kv, max_len, D] order.
    head_rows: torch.Tensor
    padding: torch.Tensor | None  # [n, max_len] bool, True past a sequence's length
    lens: torch.Tensor  # [n] int64, their context lengths


@dataclass
class PrefillSequence:
    q_start: int
    q_end: int
    slots: torch.Tensor  # [seq_len] int64


@dataclass
class AttentionPlan:
    """How one step's attention is computed; built once per step, used by every layer."""

    decode: list[DecodeBucket]
    prefill: list[PrefillSequence]


def plan_attention(block_tables: torch.Tensor, seq_lens: list[int], query_lens: list[int],
                   block_size: int, num_kv_heads: int, max_padding: float = 0.25) -> AttentionPlan:
    """Group decode tokens into buckets whose padding stays under `max_padding`.

    A decode token costs little arithmetic, so one matmul per sequence and
    layer is mostly call overhead; sorted by length and padded, a few batched
    calls do the same work.
    """
    device = block_tables.device
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    prefill = [PrefillSequence(starts[i], starts[i + 1],
                               context_slots(block_tables[i], seq_lens[i], block_size))
               for i, q_len in enumerate(query_lens) if q_len > 1]
    decode_ids = sorted((i for i, q_len in enumerate(query_lens) if q_len == 1),
                        key=lambda i: seq_lens[i])
    buckets, current, total = [], [], 0
    for i in decode_ids:  # ascending length: the newest member is the longest
        if current and seq_lens[i] * (len(current) + 1) > (1 + max_padding) * (total + seq_lens[i]):
            buckets.append(current)
            current, total = [], 0
        current.append(i)
        total += seq_lens[i]
    if current:
        buckets.append(current)
    decode = []
    offsets = torch.arange(block_size, device=device)
    heads = torch.arange(num_kv_heads, device=device)[None, :, None]
    for members in buckets:
        index = torch.tensor(members, device=device)
        lens = torch.tensor([seq_lens[i] for i in members], device=device)
        max_len = seq_lens[members[-1]]
        tables = block_tables[index, :-(-max_len // block_size)].to(torch.int64)
        slots = (tables[:, :, None] * block_size + offsets).flatten(1)[:, :max_len]
        padding = torch.arange(max_len, device=device)[None, :] >= lens[:, None]
        decode.append(DecodeBucket(rows=torch.tensor([starts[i] for i in members], device=device),
                                   head_rows=slots[:, None, :] * num_kv_heads + heads,
                                   padding=padding if padding.any() else None, lens=lens))
    return AttentionPlan(decode, prefill)


def context_slots(block_table: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """Slots of context positions 0..seq_len-1 for one sequence: [seq_len] int64."""
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].to(torch.int64)
    offsets = torch.arange(block_size, device=block_table.device)
    return (blocks[:, None] * block_size + offsets).flatten()[:seq_len]


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float,
                    window: int | None = None, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> torch.Tensor:
    """Causal attention of each sequence's queries over its paged context (the last
    `window` positions of it, with a window).

    Returns [num_tokens, num_heads, head_dim] in the query's dtype.
    """
    starts = query_start_loc.tolist()
    query_lens = [end - start for start, end in pairwise(starts)]
    plan = plan_attention(block_tables, seq_lens.tolist(), query_lens, key_cache.shape[1],
                          key_cache.shape[2])
    return run_attention_plan(query, key_cache, value_cache, plan, scale, window=window,
                              k_scale=k_scale, v_scale=v_scale)


def run_attention_plan(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                       plan: AttentionPlan, scale: float, out: torch.Tensor | None = None,
                       window: int | None = None, k_scale: float = 1.0,
                       v_scale: float = 1.0) -> torch.Tensor:
    """The plan's rows of the output (`out`'s other rows are left as they are). The plan
    holds every context position; a `window` masks those it does not reach. `k_scale`
    and `v_scale` scale an fp8 cache's values (a float cache is read as it is)."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    flat_k = key_cache.view(-1, num_kv_heads, head_dim)
    flat_v = value_cache.view(-1, num_kv_heads, head_dim)
    if out is None:
        out = torch.empty_like(query)
    for bucket in plan.decode:
        out.index_copy_(0, bucket.rows, _attend_decode(query, flat_k, flat_v, bucket, scale,
                                                       window, (k_scale, v_scale)))
    for seq in plan.prefill:
        q = query[seq.q_start:seq.q_end].transpose(0, 1)  # [H, q_len, D]
        slots, prefix_len = seq.slots, seq.slots.shape[0] - (seq.q_end - seq.q_start)
        if window is not None and prefix_len + 1 > window:  # positions no query reaches
            slots = slots[prefix_len + 1 - window:]
            prefix_len = window - 1
        k, v = _readable(flat_k.index_select(0, slots), flat_v.index_select(0, slots),
                         query.dtype, (k_scale, v_scale))
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # [H_kv, seq_len, D]
        out[seq.q_start:seq.q_end] = _attend(q, k, v, prefix_len, scale, window).transpose(0, 1)
    return out


def _readable(k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype,
              kv_scales: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Gathered K and V rows as `dtype`: dequantized when they come from an fp8 cache."""
    if fp8_format(k.dtype) is None:
        return k, v
    return dequantize(k, kv_scales[0], dtype), dequantize(v, kv_scales[1], dtype)


def _attend_decode(query: torch.Tensor, flat_k: torch.Tensor, flat_v: torch.Tensor,
                   bucket: DecodeBucket, scale: float, window: int | None,
                   kv_scales: tuple[float, float]) -> torch.Tensor:
    """One query token per sequence over its padded context -> [n, H, D]."""
    n, num_kv_heads, max_len = bucket.head_rows.shape
    _, num_heads, head_dim = query.shape
    group = num_heads // num_kv_heads
    rows = bucket.head_rows.reshape(-1)
    k, v = _readable(flat_k.view(-1, head_dim).index_select(0, rows),
                     flat_v.view(-1, head_dim).index_select(0, rows), query.dtype, kv_scales)
    k = k.view(n, num_kv_heads, max_len, head_dim)
    v = v.view(n, num_kv_heads, max_len, head_dim)
    q = query.index_select(0, bucket.rows).view(n, num_kv_heads, group, head_dim)
    scores = torch.matmul(q, k.transpose(2, 3)).float() * scale  # [n, H_kv, group, max_len]
    masked = bucket.padding
    if window is not None and max_len > window:  # positions before the last `window`
        early = (torch.arange(max_len, device=query.device)[None, :]
                 < (bucket.lens - window)[:, None])
        masked = early if masked is None else masked | early
        # Their blocks may have been released (table holes): whatever V they read
        # now must weigh nothing, NaN included.
        v = v.masked_fill(early[:, None, :, None], 0.0)
    if masked is not None:
        scores = scores.masked_fill(masked[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v).view(n, num_heads, head_dim)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int,
            scale: float, window: int | None = None) -> torch.Tensor:
    """q: [H, q_len, D]; k, v: [H_kv, prefix_len + q_len, D] -> [H, q_len, D]; query row i
    sees positions up to prefix_len + i, and with a window the last `window` of them.

    Plain matmul-softmax-matmul: on CPUs it beats SDPA's fused kernel for
    these shapes, a decode token most. The query heads that share a
    KV head are stacked into one matrix, so K/V are never repeated for GQA.
    """
    num_heads, q_len, head_dim = q.shape
    num_kv_heads, seq_len = k.shape[0], k.shape[1]
    group = num_heads // num_kv_heads
    if q_len == 1 and (window is None or seq_len <= window):  # all of it: no mask
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
        banded = window is not None and prefix_len + end > window
        if end - start > 1 or prefix_len + start + 1 < seq_len or banded:
            rows = torch.arange(start, end, device=q.device)[:, None] + prefix_len
            positions = torch.arange(seq_len, device=q.device)[None, :]
            allowed = positions <= rows  # [rows, S]
            if banded:
                allowed &= positions > rows - window
            scores = scores.view(num_kv_heads, group, end - start, seq_len)
            scores = scores.masked_fill(~allowed, float("-inf")).view(num_kv_heads, -1, seq_len)
        probs = scores.softmax(dim=-1).to(v.dtype)
        out[:, start:end] = torch.matmul(probs, v).view(num_heads, end - start, head_dim)
    return out


def lora_shrink(x: torch.Tensor, a_stack: torch.Tensor, slots: torch.Tensor,
                scaling: torch.Tensor) -> torch.Tensor:
    """kernels/lora.lora_shrink in torch: one matmul per adapter slot present."""
    out = torch.zeros(x.shape[0], a_stack.shape[1], dtype=torch.float32, device=x.device)
    for slot in slots[slots >= 0].unique().tolist():
        rows = slots == slot
        out[rows] = (x[rows].float() @ a_stack[slot].float().t()) * scaling[slot]
    return out


def lora_expand(y: torch.Tensor, h: torch.Tensor, b_stack: torch.Tensor,
                slots: torch.Tensor) -> None:
    """kernels/lora.lora_expand in torch: y[t] += h[t] B[slots[t]]^T in place."""
    for slot in slots[slots >= 0].unique().tolist():
        rows = slots == slot
        y[rows] = (y[rows].float() + h[rows] @ b_stack[slot].float().t()).to(y.dtype)


def sgmv_shrink(x: torch.Tensor, a_stack: torch.Tensor,
                segments: list[tuple[int, int, int]], scaling: list[float]) -> torch.Tensor:
    """kernels/lora.sgmv_shrink in torch, over (slot, first row, end row) segments: one
    matmul of contiguous rows per segment, no gathering."""
    out = torch.zeros(x.shape[0], a_stack.shape[1], dtype=torch.float32, device=x.device)
    for slot, start, end in segments:
        torch.mm(x[start:end].float(), a_stack[slot].float().t(), out=out[start:end])
        out[start:end] *= scaling[slot]
    return out


def sgmv_expand(y: torch.Tensor, h: torch.Tensor, b_stack: torch.Tensor,
                segments: list[tuple[int, int, int]]) -> None:
    """kernels/lora.sgmv_expand in torch: y[rows] += h[rows] B[slot]^T per segment, in place."""
    for slot, start, end in segments:
        rows = y[start:end]
        if y.dtype == torch.float32:
            rows.addmm_(h[start:end], b_stack[slot].t())
        else:
            rows.copy_(rows.float().addmm_(h[start:end], b_stack[slot].float().t()))


def moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
        topk_ids: torch.Tensor, first_expert: int = 0) -> torch.Tensor:
    """Mixture-of-experts MLP, one token and expert at a time: the oracle of
    kernels/fused_moe.py and of the CPU path (worker/layers/moe.py).

    hidden [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; topk_weights,
    topk_ids [T, k]. Experts outside first_expert .. first_expert + E (held by other
    ranks) add nothing.
    """
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    inter = w2.shape[2]
    for t in range(hidden.shape[0]):
        x = hidden[t].float()
        for weight, expert in zip(topk_weights[t].tolist(), topk_ids[t].tolist(), strict=True):
            local = expert - first_expert
            if not 0 <= local < w13.shape[0]:
                continue
            gate_up = w13[local].float() @ x
            act = torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]
            out[t] += weight * (w2[local].float() @ act)
    return out.to(hidden.dtype)


def quant_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                 offsets: torch.Tensor | None, group: int) -> torch.Tensor:
    """x @ W^T in float32 for W[n, k] = q[n, k] * scales[n, k // group] + offsets[n, k // group]
    (offsets None: zero), the weight dequantized to float32 first: the oracle of
    kernels/quant_gemm.py.

    x: [M, K]; q: [N, K] of any dtype that converts to float (uint8 4-bit codes, int8,
    float8_e4m3fn); scales, offsets: [N, K // group]. Returns [M, N] float32.
    """
    weight = q.float() * scales.float().repeat_interleave(group, dim=1)
    if offsets is not None:
        weight += offsets.float().repeat_interleave(group, dim=1)
    return x.float() @ weight.t()
