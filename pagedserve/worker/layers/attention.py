"""Attention over the paged KV pool, behind one small interface.

The model hands each layer's q/k/v, its slice of the pool and the step's
`AttentionMetadata` to `Attention`; the metadata carries the backend that
runs it, so model code never knows which one does:

    cpu     kernels/cpu_kernels.py: a C++ kernel reading the blocks in place, the CPU path
    torch   kernels/reference.py: gathers and batched matmuls, the oracle (and any device)
    triton  kernels/*_attention.py: paged kernels, the CUDA path

A backend prepares whatever it needs once per step (`plan`); every layer
reuses it, since every layer reads the same positions.

Every backend reads and writes an fp8 pool too (engine.kv_cache_dtype,
kernels/kv_quant.py): K and V are quantized as they are written, with the
layer's `k_scale` and `v_scale`, and dequantized as they are read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from pagedserve.kernels import cpu_kernels, reference
from pagedserve.kernels.checks import interpreting

# One layer's paged keys and values, each [num_blocks, block_size, kv heads of this rank, head_dim].
KVCache = tuple[torch.Tensor, torch.Tensor]
logger = logging.getLogger(__name__)


@dataclass
class AttentionMetadata:
    """Where a step's tokens live in the pool. Shapes as in kernels/reference.py.

    Sequences with one query token come first (`num_decodes` of them, one row
    each), then the prefill chunks, so a backend can hand each kind to its own
    kernel without gathering rows.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with block 0
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    backend: AttentionBackend
    plan: object  # the backend's own per-step preparation


class AttentionBackend(Protocol):
    name: str
    # Whether a decode step's plan depends on the batch size alone
    # (`graph_plan`), so that a CUDA graph can replay it.
    supports_graphs: bool

    def plan(self, block_tables: torch.Tensor, seq_lens: list[int], query_lens: list[int],
             num_decodes: int, block_size: int) -> object: ...

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata, scale: float, window: int | None = None,
                k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """window: the layer's sliding window (a query sees its last `window` positions),
        None for full attention. k_scale, v_scale: an fp8 cache's (a float one ignores
        them)."""
        ...

    def copy_blocks(self, kv_pool: torch.Tensor, block_mapping: torch.Tensor) -> None: ...


class TorchAttentionBackend:
    name = "torch"
    supports_graphs = False  # its plan gathers each step's context on the host

    def __init__(self, num_kv_heads: int) -> None:
        self.num_kv_heads = num_kv_heads

    def plan(self, block_tables, seq_lens, query_lens, num_decodes, block_size):
        return reference.plan_attention(block_tables, seq_lens, query_lens, block_size,
                                        self.num_kv_heads)

    def forward(self, q, k, v, kv_cache, metadata, scale, window=None, k_scale=1.0,
                v_scale=1.0):
        key_cache, value_cache = kv_cache
        reference.write_kv_cache(k, v, key_cache, value_cache, metadata.slot_mapping,
                                 k_scale, v_scale)
        return reference.run_attention_plan(q, key_cache, value_cache, metadata.plan, scale,
                                            window=window, k_scale=k_scale, v_scale=v_scale)

    def copy_blocks(self, kv_pool, block_mapping):
        reference.copy_blocks(kv_pool, block_mapping)


@dataclass
class _CPUPlan:
    kernel_seqs: torch.Tensor | None  # [n] int32, the sequences the C++ kernel computes
    matmul: reference.AttentionPlan | None  # the prompt chunks the torch path computes


class CPUAttentionBackend:
    """Decode tokens and short chunks through kernels/cpu_kernels.py, which reads K/V
    where they lie; chunks of `MATMUL_FROM` query rows or more through the torch path's
    matmuls over their gathered context, which run at BLAS speed (for those, the gather
    is a small part of the work, and the kernel's loops were measured slower)."""

    name = "cpu"
    supports_graphs = False
    MATMUL_FROM = 4

    def __init__(self, num_kv_heads: int) -> None:
        self.num_kv_heads = num_kv_heads
        cpu_kernels.extension()  # built (or loaded) now, not in the first step

    def plan(self, block_tables, seq_lens, query_lens, num_decodes, block_size):
        long = [i for i, q_len in enumerate(query_lens) if q_len >= self.MATMUL_FROM]
        if not long:
            return _CPUPlan(None, None)
        starts = [0]
        for q_len in query_lens:
            starts.append(starts[-1] + q_len)
        prefill = [reference.PrefillSequence(starts[i], starts[i + 1], reference.context_slots(
            block_tables[i], seq_lens[i], block_size)) for i in long]
        short = sorted(set(range(len(query_lens))) - set(long))
        kernel_seqs = torch.tensor(short, dtype=torch.int32) if short else None
        return _CPUPlan(kernel_seqs, reference.AttentionPlan([], prefill))

    def forward(self, q, k, v, kv_cache, metadata, scale, window=None, k_scale=1.0,
                v_scale=1.0):
        key_cache, value_cache = kv_cache
        if key_cache.dtype == k.dtype:
            cpu_kernels.write_kv_cache(k, v, key_cache, value_cache, metadata.slot_mapping)
        else:  # an fp8 cache: quantized by the scales
            reference.write_kv_cache(k, v, key_cache, value_cache, metadata.slot_mapping,
                                     k_scale, v_scale)
        plan: _CPUPlan = metadata.plan
        out = torch.empty_like(q)
        if plan.matmul is None or plan.kernel_seqs is not None:
            cpu_kernels.paged_attention(q, key_cache, value_cache, metadata.block_tables,
                                        metadata.seq_lens, metadata.query_start_loc, scale,
                                        out=out, sequences=plan.kernel_seqs, window=window,
                                        k_scale=k_scale, v_scale=v_scale)
        if plan.matmul is not None:
            reference.run_attention_plan(q, key_cache, value_cache, plan.matmul, scale, out=out,
                                         window=window, k_scale=k_scale, v_scale=v_scale)
        return out

    def copy_blocks(self, kv_pool, block_mapping):
        reference.copy_blocks(kv_pool, block_mapping)


@dataclass
class _TritonPlan:
    decode_max_seq_len: int
    num_splits: int  # for the decode kernel
    prefill_cu_seqlens: torch.Tensor | None  # [num_prefills + 1] int32, rows after the decodes


class TritonAttentionBackend:
    name = "triton"
    supports_graphs = True

    def __init__(self, num_kv_heads: int) -> None:
        # Imported here: Triton decides at decoration time whether kernels are interpreted.
        from pagedserve.kernels import cache_ops, decode_attention, prefill_attention

        self.num_kv_heads = num_kv_heads
        self._cache_ops = cache_ops
        self._decode = decode_attention
        self._prefill = prefill_attention

    def plan(self, block_tables, seq_lens, query_lens, num_decodes, block_size):
        device = block_tables.device
        decode_max_seq_len = max(seq_lens[:num_decodes], default=1)
        num_splits = self._decode.default_num_splits(device, num_decodes, self.num_kv_heads,
                                                      decode_max_seq_len)
        cu_seqlens = None
        if num_decodes < len(query_lens):
            starts = [0]
            for q_len in query_lens[num_decodes:]:
                starts.append(starts[-1] + q_len)
            cu_seqlens = torch.tensor(starts, dtype=torch.int32, device=device)
        return _TritonPlan(decode_max_seq_len, num_splits, cu_seqlens)

    def graph_plan(self, num_decodes: int, max_seq_len: int, device: torch.device) -> _TritonPlan:
        """The plan of any decode-only step of `num_decodes` sequences up to `max_seq_len`."""
        num_splits = self._decode.default_num_splits(device, num_decodes, self.num_kv_heads,
                                                      max_seq_len)
        return _TritonPlan(max_seq_len, num_splits, None)

    def forward(self, q, k, v, kv_cache, metadata, scale, window=None, k_scale=1.0,
                v_scale=1.0):
        key_cache, value_cache = kv_cache
        self._cache_ops.write_kv_cache(k, v, key_cache, value_cache, metadata.slot_mapping,
                                       k_scale, v_scale)
        plan: _TritonPlan = metadata.plan
        out = torch.empty_like(q)
        n = metadata.num_decodes  # decode sequences own rows 0..n-1
        if n:
            self._decode.paged_decode_attention(
                q[:n], key_cache, value_cache, metadata.block_tables[:n], metadata.seq_lens[:n],
                scale, max_seq_len=plan.decode_max_seq_len, num_splits=plan.num_splits, out=out[:n],
                window=window, k_scale=k_scale, v_scale=v_scale)
        if plan.prefill_cu_seqlens is not None:
            self._prefill.paged_prefill_attention(
                q[n:], key_cache, value_cache, metadata.block_tables[n:], metadata.seq_lens[n:],
                plan.prefill_cu_seqlens, scale, max_query_len=metadata.max_query_len, out=out[n:],
                window=window, k_scale=k_scale, v_scale=v_scale)
        return out

    def copy_blocks(self, kv_pool, block_mapping):
        self._cache_ops.copy_blocks(kv_pool, block_mapping)


def select_attention_backend(name: str, device: torch.device,
                             num_kv_heads: int) -> AttentionBackend:
    """`auto` is Triton on CUDA, the C++ kernel on the CPU and torch elsewhere (see
    EngineConfig.attention_backend). Where the C++ kernel cannot be built, `auto` warns
    and uses torch; asked for by name, it raises."""
    if name == "auto":
        if device.type == "cuda":
            name = "triton"
        elif device.type == "cpu":
            try:
                return CPUAttentionBackend(num_kv_heads)
            except cpu_kernels.CPUKernelsUnavailable as error:
                logger.warning("attention_backend='auto' uses 'torch': %s", error)
                name = "torch"
        else:
            name = "torch"
    if name == "torch":
        return TorchAttentionBackend(num_kv_heads)
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"attention_backend='cpu' runs on the CPU, but the engine runs on "
                             f"{device.type}; use 'auto'")
        return CPUAttentionBackend(num_kv_heads)
    if name != "triton":
        raise ValueError(f"attention_backend={name!r}: expected 'auto', 'cpu', 'triton' or "
                         "'torch'")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"attention_backend='triton' needs a CUDA device, but the engine runs on "
                         f"{device.type}; use 'cpu' or 'torch' (or 'auto'), or set "
                         "TRITON_INTERPRET=1 to run the kernels in Triton's interpreter")
    return TritonAttentionBackend(num_kv_heads)


class Attention(nn.Module):
    """One layer's attention: full, or over a sliding `window` (a query at position p sees
    positions p - window + 1 .. p); softmax(q k^T * scale), scale head_dim^-0.5 unless
    the model says otherwise. `k_scale` and `v_scale` scale what an fp8 KV cache stores
    (the checkpoint's, worker/layers/kv_scales.py, else 1.0)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 window: int | None = None, scale: float | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.window = window
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, H_kv, D] -> [T, H, D]."""
        return metadata.backend.forward(q, k, v, kv_cache, metadata, self.scale, self.window,
                                        self.k_scale, self.v_scale)
