"""Triton paged attention against dense attention on contiguous K/V.

On this CPU the kernels run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1); on a GPU, `TRITON_INTERPRET=0 pytest tests/kernels/test_triton_*.py`
compiles them for real and runs the same cases plus Llama-3-8B shapes.

Every call writes into an output poisoned with NaN, and every cache slot
outside the batch's contexts holds NaN too: an element the kernel skips, or
a slot it reads that it should not, fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
from support.paged_batch import make_paged_batch, poison_before_windows

from pagedserve.kernels.checks import interpreting
from pagedserve.kernels.decode_attention import (
    MAX_SPLITS,
    choose_num_splits,
    default_num_splits,
    paged_decode_attention,
)
from pagedserve.kernels.prefill_attention import paged_prefill_attention
from pagedserve.worker.layers.attention import (
    AttentionMetadata,
    TorchAttentionBackend,
    TritonAttentionBackend,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not interpreting() else "cpu")
# Against float64 attention over the same stored values. bfloat16 keeps 8 significant
# bits: the output and the probabilities fed to P @ V are each rounded once.
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
HEADS = [(4, 4), (8, 2), (8, 1)]  # GQA ratios 1, 4, 8
DECODE_LENS = [1, 9, 31, 64, 100]  # most not multiples of any block size
PREFILL_SEQS = [(7, 7), (40, 13), (70, 70), (31, 2), (5, 1), (100, 33)]  # (context, query)


def to_device(batch):
    for name in ("query", "key_cache", "value_cache", "block_tables", "seq_lens",
                 "query_start_loc", "slot_mapping"):
        setattr(batch, name, getattr(batch, name).to(DEVICE))
    return batch


def poisoned_like(tensor):
    return torch.full_like(tensor, float("nan"))


def check(out, batch, dtype):
    assert not out.isnan().any(), "an output element was not written, or NaN was read"
    torch.testing.assert_close(out.cpu().double(), batch.expected(), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_decode(block_size, head_dim, num_heads, num_kv_heads, num_splits, dtype):
    batch = to_device(make_paged_batch(
        [(n, 1) for n in DECODE_LENS], block_size=block_size, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, poison_unused=True,
        seed=block_size + head_dim + num_kv_heads))
    out = poisoned_like(batch.query)

    result = paged_decode_attention(batch.query, batch.key_cache, batch.value_cache,
                                    batch.block_tables, batch.seq_lens, batch.scale,
                                    max_seq_len=max(DECODE_LENS), num_splits=num_splits, out=out)

    assert result is out
    check(out, batch, dtype)


def test_decode_splits_longer_than_some_contexts():
    """With many splits, short sequences leave whole splits empty; they must weigh nothing."""
    batch = to_device(make_paged_batch([(3, 1), (250, 1)], block_size=16, num_heads=8,
                                       num_kv_heads=2, head_dim=64, poison_unused=True))
    out = paged_decode_attention(batch.query, batch.key_cache, batch.value_cache,
                                 batch.block_tables, batch.seq_lens, batch.scale,
                                 max_seq_len=250, num_splits=8, block_n=16)
    check(out, batch, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_prefill(block_size, head_dim, num_heads, num_kv_heads, dtype):
    """Whole prompts, chunks over a computed prefix, and single-token chunks in one batch."""
    batch = to_device(make_paged_batch(
        PREFILL_SEQS, block_size=block_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, dtype=dtype, poison_unused=True, seed=block_size + num_heads))
    out = poisoned_like(batch.query)

    paged_prefill_attention(batch.query, batch.key_cache, batch.value_cache, batch.block_tables,
                            batch.seq_lens, batch.query_start_loc, batch.scale,
                            max_query_len=max(q for _, q in PREFILL_SEQS), out=out)

    check(out, batch, dtype)


@pytest.mark.parametrize("window", [1, 7, 40])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_with_a_sliding_window(window, num_splits):
    seqs = [(n, 1) for n in DECODE_LENS]
    batch = make_paged_batch(seqs, block_size=16, num_heads=8, num_kv_heads=2, head_dim=64,
                             poison_unused=True, seed=window)
    poison_before_windows(batch, seqs, window)
    batch = to_device(batch)
    out = paged_decode_attention(batch.query, batch.key_cache, batch.value_cache,
                                 batch.block_tables, batch.seq_lens, batch.scale,
                                 max_seq_len=max(DECODE_LENS), num_splits=num_splits,
                                 window=window)
    assert not out.isnan().any()
    torch.testing.assert_close(out.cpu().double(), batch.expected(window), **TOLERANCE[
        torch.float32])


@pytest.mark.parametrize("window", [1, 7, 40])
@pytest.mark.parametrize("block_q,block_n", [(16, 16), (64, 16)])
def test_prefill_with_a_sliding_window(window, block_q, block_n):
    """Tiles of 64 query rows over 16 positions: a row may see nothing in a tile."""
    batch = make_paged_batch(PREFILL_SEQS, block_size=16, num_heads=4, num_kv_heads=4,
                             head_dim=64, poison_unused=True, seed=window)
    poison_before_windows(batch, PREFILL_SEQS, window)
    batch = to_device(batch)
    out = paged_prefill_attention(batch.query, batch.key_cache, batch.value_cache,
                                  batch.block_tables, batch.seq_lens, batch.query_start_loc,
                                  batch.scale, max_query_len=70, block_q=block_q,
                                  block_n=block_n, window=window)
    assert not out.isnan().any()
    torch.testing.assert_close(out.cpu().double(), batch.expected(window), **TOLERANCE[
        torch.float32])


@pytest.mark.parametrize("block_q,block_n", [(16, 16), (32, 64)])
def test_prefill_tiles_smaller_and_larger_than_blocks(block_q, block_n):
    batch = to_device(make_paged_batch(PREFILL_SEQS, block_size=32, num_heads=4, num_kv_heads=4,
                                       head_dim=64, poison_unused=True, seed=block_q))
    out = paged_prefill_attention(batch.query, batch.key_cache, batch.value_cache,
                                  batch.block_tables, batch.seq_lens, batch.query_start_loc,
                                  batch.scale, max_query_len=70, block_q=block_q, block_n=block_n)
    check(out, batch, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
def test_backend_mixed_batch(num_heads, num_kv_heads, dtype):
    """The engine's path: write this step's K/V, then decodes and prefill chunks in one call."""
    seqs = [(n, 1) for n in DECODE_LENS] + PREFILL_SEQS  # decodes first, as the runner orders
    batch = to_device(make_paged_batch(seqs, block_size=16, num_heads=num_heads,
                                       num_kv_heads=num_kv_heads, head_dim=64, dtype=dtype,
                                       poison_unused=True, seed=num_kv_heads))
    # This step's own K/V arrive with the step: clear their slots so only the write fills them.
    rows = batch.slot_mapping
    k_new = batch.key_cache.view(-1, num_kv_heads, 64)[rows].clone()
    v_new = batch.value_cache.view(-1, num_kv_heads, 64)[rows].clone()
    batch.key_cache.view(-1, num_kv_heads, 64)[rows] = float("nan")
    batch.value_cache.view(-1, num_kv_heads, 64)[rows] = float("nan")
    backend = TritonAttentionBackend(num_kv_heads)
    seq_lens = [s for s, _ in seqs]
    query_lens = [q for _, q in seqs]
    num_decodes = len(DECODE_LENS)
    metadata = AttentionMetadata(
        slot_mapping=batch.slot_mapping, query_start_loc=batch.query_start_loc,
        seq_lens=batch.seq_lens, block_tables=batch.block_tables, num_decodes=num_decodes,
        max_query_len=max(query_lens), max_seq_len=max(seq_lens), backend=backend,
        plan=backend.plan(batch.block_tables, seq_lens, query_lens, num_decodes, 16))

    out = backend.forward(batch.query, k_new, v_new, (batch.key_cache, batch.value_cache),
                          metadata, batch.scale)

    check(out, batch, dtype)


def test_backends_agree_on_engine_metadata():
    """Torch and Triton backends, same metadata, same answer (and same cache afterwards)."""
    seqs = [(n, 1) for n in DECODE_LENS] + PREFILL_SEQS
    outs, caches = [], []
    for backend in (TorchAttentionBackend(2), TritonAttentionBackend(2)):
        batch = to_device(make_paged_batch(seqs, block_size=8, num_heads=8, num_kv_heads=2,
                                           head_dim=64))
        gen = torch.Generator().manual_seed(1)
        k_new, v_new = torch.randn(2, batch.query.shape[0], 2, 64, generator=gen).to(DEVICE)
        seq_lens, query_lens = [s for s, _ in seqs], [q for _, q in seqs]
        metadata = AttentionMetadata(
            slot_mapping=batch.slot_mapping, query_start_loc=batch.query_start_loc,
            seq_lens=batch.seq_lens, block_tables=batch.block_tables,
            num_decodes=len(DECODE_LENS), max_query_len=70, max_seq_len=100, backend=backend,
            plan=backend.plan(batch.block_tables, seq_lens, query_lens, len(DECODE_LENS), 8))
        outs.append(backend.forward(batch.query, k_new, v_new,
                                    (batch.key_cache, batch.value_cache), metadata, batch.scale))
        caches.append((batch.key_cache, batch.value_cache))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[0], caches[1], atol=0, rtol=0)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="Llama-3-8B shapes are checked on a GPU")
@pytest.mark.parametrize("num_splits", [1, None])
def test_llama3_8b_shapes_bf16(num_splits):
    """32 query heads over 8 KV heads, head_dim 128, block 16, contexts up to 2k tokens."""
    seqs = [(n, 1) for n in (1, 100, 777, 2048)] + [(2000, 500), (513, 513)]
    batch = to_device(make_paged_batch(seqs, block_size=16, num_heads=32, num_kv_heads=8,
                                       head_dim=128, dtype=torch.bfloat16, poison_unused=True))
    out = poisoned_like(batch.query)
    paged_decode_attention(batch.query[:4], batch.key_cache, batch.value_cache,
                           batch.block_tables[:4], batch.seq_lens[:4], batch.scale,
                           max_seq_len=2048, num_splits=num_splits, out=out[:4])
    cu = (batch.query_start_loc[4:] - 4).contiguous()
    paged_prefill_attention(batch.query[4:], batch.key_cache, batch.value_cache,
                            batch.block_tables[4:], batch.seq_lens[4:], cu, batch.scale,
                            max_query_len=513, out=out[4:])
    check(out, batch, torch.bfloat16)


@pytest.mark.parametrize("num_seqs,num_kv_heads,max_seq_len,num_sms,expected", [
    (64, 8, 8192, 132, 1),     # 512 programs already fill 132 SMs
    (132, 1, 8192, 132, 1),    # exactly one wave
    (1, 8, 8192, 132, 32),     # wants 33, capped at MAX_SPLITS
    (1, 8, 2048, 132, 8),      # capped at 256 tokens per split
    (16, 8, 512, 132, 2),      # 128 programs: two splits make two waves
    (1, 8, 100, 132, 1),       # too short to be worth splitting
    (0, 8, 1, 132, 1),         # a step with no decodes
    (4, 2, 4096, 108, 16),     # A100-sized: ceil(216 / 8) = 27, 16 splits of 256
])
def test_choose_num_splits(num_seqs, num_kv_heads, max_seq_len, num_sms, expected):
    assert choose_num_splits(num_seqs, num_kv_heads, max_seq_len, num_sms) == expected
    assert 1 <= expected <= MAX_SPLITS


def test_no_split_off_cuda():
    assert default_num_splits(torch.device("cpu"), 1, 1, 100_000) == 1
