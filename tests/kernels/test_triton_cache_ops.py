"""KV writes, block copies and swaps; and the launchers' argument checks."""

from __future__ import annotations

import re

import pytest
import torch
from support.paged_batch import make_paged_batch

from pagedserve.kernels import cache_ops, reference
from pagedserve.kernels.checks import interpreting
from pagedserve.kernels.decode_attention import paged_decode_attention
from pagedserve.kernels.prefill_attention import paged_prefill_attention
from pagedserve.kernels.swap import swap_blocks

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not interpreting() else "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 64), (3, 128), (1, 80)])
@pytest.mark.parametrize("block_size", [8, 32])
def test_write_kv_cache(block_size, num_kv_heads, head_dim, dtype):
    """Rows land in exactly their slots; every other slot keeps its poison."""
    gen = torch.Generator().manual_seed(block_size + head_dim)
    num_blocks, num_tokens = 6, 21
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    value_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    # K and V as views into one fused projection output, as the model produces them.
    qkv = torch.randn(num_tokens, 4 * num_kv_heads * head_dim, generator=gen).to(dtype).to(DEVICE)
    width = num_kv_heads * head_dim
    key = qkv[:, 2 * width:3 * width].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, 3 * width:].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(DEVICE)

    cache_ops.write_kv_cache(key, value, key_cache, value_cache, slots)

    for cache, rows in ((key_cache, key), (value_cache, value)):
        flat = cache.view(-1, num_kv_heads, head_dim)
        assert torch.equal(flat[slots], rows)
        untouched = torch.ones(flat.shape[0], dtype=torch.bool, device=DEVICE)
        untouched[slots] = False
        assert flat[untouched].isnan().all()


def test_write_kv_cache_matches_reference():
    gen = torch.Generator().manual_seed(0)
    key, value = torch.randn(2, 9, 2, 64, generator=gen).to(DEVICE)
    slots = torch.tensor([5, 0, 17, 63, 8, 9, 40, 33, 2], device=DEVICE)
    caches = [torch.zeros(2, 4, 16, 2, 64, device=DEVICE) for _ in range(2)]
    reference.write_kv_cache(key, value, *caches[0], slots)
    cache_ops.write_kv_cache(key, value, *caches[1], slots)
    assert torch.equal(caches[0], caches[1])


def test_negative_slots_are_padding_rows_that_write_nothing():
    """A CUDA graph pads its batch with rows whose slot is -1: Triton and the reference
    skip them.
    """
    gen = torch.Generator().manual_seed(1)
    key, value = torch.randn(2, 6, 2, 64, generator=gen).to(DEVICE)
    slots = torch.tensor([5, -1, 17, -1, -1, 2], device=DEVICE)
    for write in (reference.write_kv_cache, cache_ops.write_kv_cache):
        caches = [torch.full((4, 8, 2, 64), float("nan"), device=DEVICE) for _ in range(2)]
        write(key, value, *caches, slots)
        for cache, rows in zip(caches, (key, value), strict=True):
            flat = cache.view(-1, 2, 64)
            assert torch.equal(flat[[5, 17, 2]], rows[[0, 2, 5]])
            assert flat.isnan().all(dim=(1, 2)).sum() == 32 - 3


def make_pool(num_layers=3, num_blocks=10, block_size=8, num_kv_heads=2, head_dim=64,
              dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
    return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,head_dim", [(8, 64), (32, 128)])
def test_copy_blocks(block_size, head_dim, dtype):
    pool = make_pool(block_size=block_size, head_dim=head_dim, dtype=dtype)
    before = pool.clone()
    mapping = torch.tensor([[1, 7], [4, 2], [1, 9]], dtype=torch.int64, device=DEVICE)

    cache_ops.copy_blocks(pool, mapping)

    expected = before.clone()
    reference.copy_blocks(expected, mapping)
    assert torch.equal(pool, expected)
    for src, dst in mapping.tolist():  # the reference itself, checked directly
        assert torch.equal(pool[:, :, dst], before[:, :, src])
    for block in (0, 1, 3, 4, 5, 6, 8):
        assert torch.equal(pool[:, :, block], before[:, :, block])


def test_swap_blocks_round_trip():
    device_pool = make_pool(num_blocks=10, seed=1)
    host_pool = torch.zeros((3, 2, 4, 8, 2, 64))
    out = torch.tensor([[7, 0], [2, 3]])  # device block -> host block
    swap_blocks(device_pool, host_pool, out)
    assert torch.equal(host_pool[:, :, 0], device_pool[:, :, 7].cpu())
    assert torch.equal(host_pool[:, :, 3], device_pool[:, :, 2].cpu())
    assert not host_pool[:, :, 1:3].any()

    back = torch.tensor([[0, 5], [3, 6]])  # host block -> device block
    swap_blocks(host_pool, device_pool, back)
    assert torch.equal(device_pool[:, :, 5], device_pool[:, :, 7])
    assert torch.equal(device_pool[:, :, 6], device_pool[:, :, 2])


def test_empty_calls_are_no_ops():
    pool = make_pool()
    before = pool.clone()
    cache_ops.copy_blocks(pool, torch.zeros(0, 2, dtype=torch.int64, device=DEVICE))
    empty = torch.zeros(0, 2, 64, device=DEVICE)
    cache_ops.write_kv_cache(empty, empty, pool[0, 0], pool[0, 1],
                             torch.zeros(0, dtype=torch.int64, device=DEVICE))
    assert torch.equal(pool, before)


# -- launcher checks: a wrong argument is named, not silently misread --------------------

def _decode_args(device=DEVICE, **changes):
    batch = make_paged_batch([(9, 1), (20, 1)], block_size=8, num_heads=4, num_kv_heads=2,
                             head_dim=64)
    for name in ("query", "key_cache", "value_cache", "block_tables", "seq_lens"):
        setattr(batch, name, getattr(batch, name).to(device))
    args = dict(query=batch.query, key_cache=batch.key_cache, value_cache=batch.value_cache,
                block_tables=batch.block_tables, seq_lens=batch.seq_lens, scale=batch.scale,
                max_seq_len=20)
    args.update({name: change(args[name]) if callable(change) else change
                 for name, change in changes.items()})
    return args


@pytest.mark.parametrize("changes,message", [
    (dict(query=lambda q: q.to(torch.float16)), "key_cache has dtype float32"),
    (dict(query=lambda q: q.to(torch.int32)), "query has dtype int32"),
    (dict(query=lambda q: q[:, :, :32]), "query head_dim 32 != key_cache head_dim 64"),
    (dict(query=lambda q: q.transpose(1, 2).contiguous().transpose(1, 2)),
     "query must be contiguous in its last dimension"),
    (dict(query=lambda q: q[:, :3]), "num_heads=3 is not a multiple of num_kv_heads=2"),
    (dict(block_tables=lambda t: t.long()), "block_tables has dtype int64"),
    (dict(seq_lens=lambda s: s[:1]), "block_tables has 2 rows for 1 seq_lens"),
    (dict(key_cache=lambda k: k[:, :6]),
     "key_cache (10, 6, 2, 64) and value_cache (10, 8, 2, 64) differ in shape"),
    (dict(max_seq_len=100), "fewer than max_seq_len=100"),
    (dict(num_splits=0), "num_splits=0 must be between 1 and 32"),
    (dict(out=torch.empty(2, 4, 32, device=DEVICE)), "out has shape (2, 4, 32)"),
])
def test_decode_launcher_rejects(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        paged_decode_attention(**_decode_args(**changes))


def test_prefill_launcher_rejects_mismatched_cu_seqlens():
    batch = make_paged_batch([(9, 4), (20, 5)], block_size=8, num_heads=4, num_kv_heads=2,
                             head_dim=64)
    for name in ("query", "key_cache", "value_cache", "block_tables", "seq_lens",
                 "query_start_loc"):
        setattr(batch, name, getattr(batch, name).to(DEVICE))
    with pytest.raises(ValueError, match="cu_seqlens_q has 2 entries"):
        paged_prefill_attention(batch.query, batch.key_cache, batch.value_cache,
                                batch.block_tables, batch.seq_lens, batch.query_start_loc[:2],
                                batch.scale, max_query_len=5)
    with pytest.raises(ValueError, match="cu_seqlens_q has dtype int64"):
        paged_prefill_attention(batch.query, batch.key_cache, batch.value_cache,
                                batch.block_tables, batch.seq_lens, batch.query_start_loc.long(),
                                batch.scale, max_query_len=5)


def test_cache_op_launchers_reject():
    pool = make_pool()
    with pytest.raises(ValueError, match=r"block_mapping must be \[num_pairs, 2\]"):
        cache_ops.copy_blocks(pool, torch.tensor([[1, 2, 3]], device=DEVICE))
    with pytest.raises(ValueError, match="kv_pool must be contiguous"):
        cache_ops.copy_blocks(pool.transpose(0, 2), torch.tensor([[1, 2]], device=DEVICE))
    with pytest.raises(ValueError, match="slot_mapping has dtype int32"):
        key = torch.zeros(3, 2, 64, device=DEVICE)
        cache_ops.write_kv_cache(key, key, pool[0, 0], pool[0, 1],
                                 torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"key rows are \[num_kv_heads, head_dim\] = \[4, 32\]"):
        key = torch.zeros(3, 4, 32, device=DEVICE)
        cache_ops.write_kv_cache(key, key, pool[0, 0], pool[0, 1],
                                 torch.tensor([0, 1, 2], device=DEVICE))
    with pytest.raises(ValueError, match="differ in layout"):
        swap_blocks(pool, torch.zeros(3, 2, 4, 8, 2, 32), torch.tensor([[0, 0]]))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="Triton kernels need a CUDA device.*TRITON_INTERPRET=1"):
        paged_decode_attention(**_decode_args(device=torch.device("cpu")))
