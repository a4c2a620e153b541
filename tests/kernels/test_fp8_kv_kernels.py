"""An fp8 KV cache (engine.kv_cache_dtype): quantized writes, dequantized reads, byte moves.

Every path is held to torch's own fp8 casts and to float64 attention over the
values the cache stores (so the only error left is the kernels' arithmetic, as
for a float cache): the Triton kernels in Triton's interpreter (conftest sets
TRITON_INTERPRET=1), the C++ CPU kernel, and the torch reference.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from support.paged_batch import make_paged_batch

from pagedserve.kernels import cache_ops, kv_quant, reference
from pagedserve.kernels.checks import interpreting
from pagedserve.kernels.fp8_codec import decode_fp8
from pagedserve.kernels.swap import swap_blocks
from pagedserve.worker.layers.attention import (
    AttentionMetadata,
    CPUAttentionBackend,
    TorchAttentionBackend,
    TritonAttentionBackend,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not interpreting() else "cpu")
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
K_SCALE, V_SCALE = 0.5, 2.0


def _finite_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of an fp8 dtype, ascending."""
    values = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    return values[values.isfinite()].unique()


@pytest.mark.parametrize("dtype", FP8)
def test_quantize_saturates(dtype):
    limit = kv_quant.FP8_FORMATS[dtype].max
    x = torch.tensor([1e9, -1e9, limit * 1.06, 3.0, -1e-30])
    stored = kv_quant.quantize(x, 1.0, dtype).float()
    assert stored.isfinite().all()
    assert stored.tolist()[:4] == [limit, -limit, limit, 3.0]
    assert kv_quant.dequantize(kv_quant.quantize(x, 4.0, dtype), 4.0, torch.float32)[3] == 3.0


def test_kv_cache_dtype_names():
    assert kv_quant.kv_cache_dtype("auto", torch.bfloat16) is torch.bfloat16
    assert kv_quant.kv_cache_dtype("fp8", torch.bfloat16) is torch.float8_e4m3fn
    assert kv_quant.kv_cache_dtype("fp8_e5m2", torch.float32) is torch.float8_e5m2
    with pytest.raises(ValueError, match="engine.kv_cache_dtype='int8'"):
        kv_quant.kv_cache_dtype("int8", torch.bfloat16)


@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", FP8)
def test_triton_write_encodes_as_torch(dtype, source):
    """Bit for bit torch's cast of clamp(x / scale): every value, every midpoint between
    neighbours (ties go to even), subnormals, and values far past the range."""
    values = _finite_values(dtype)
    midpoints = (values[1:].double() + values[:-1].double()) / 2
    gen = torch.Generator().manual_seed(0)
    noise = torch.cat([torch.randn(2048, generator=gen) * s for s in (1e-3, 1.0, 100.0, 1e5)])
    x = torch.cat([values, midpoints.float(), noise, torch.tensor([1e9, -1e9, 0.0, -0.0])])
    x = x[: x.numel() // 64 * 64].view(-1, 1, 64).to(source) * K_SCALE  # [tokens, 1 head, 64]
    slots = torch.randperm(x.shape[0], generator=gen)
    caches = [torch.zeros(x.shape[0], 1, 1, 64, dtype=dtype, device=DEVICE) for _ in range(4)]
    x, slots = x.to(DEVICE), slots.to(DEVICE)

    reference.write_kv_cache(x, x * 4, caches[0], caches[1], slots, K_SCALE, V_SCALE)
    cache_ops.write_kv_cache(x, x * 4, caches[2], caches[3], slots, K_SCALE, V_SCALE)

    for expected, got in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(expected.view(torch.uint8), got.view(torch.uint8))


@triton.jit
def _decode_kernel(codes_ptr, out_ptr, FORMAT: tl.constexpr):
    offsets = tl.arange(0, 256)
    tl.store(out_ptr + offsets, decode_fp8(tl.load(codes_ptr + offsets), FORMAT))


@pytest.mark.parametrize("dtype", FP8)
def test_triton_decode_reads_every_code(dtype):
    codes = torch.arange(256, dtype=torch.uint8, device=DEVICE)
    out = torch.empty(256, device=DEVICE)
    _decode_kernel[(1,)](codes, out, FORMAT=kv_quant.FP8_FORMATS[dtype].name)
    expected = codes.view(dtype).float()
    finite = expected.isfinite()  # the NaN (and e5m2's inf) codes are never stored
    assert torch.equal(out[finite], expected[finite])


def _fp8_batch(dtype: torch.dtype, query_dtype: torch.dtype, seqs, num_kv_heads: int):
    """A paged batch whose caches hold fp8 (K scaled by K_SCALE, V by V_SCALE), this
    step's rows cleared, and its expected attention over the values stored."""
    batch = make_paged_batch(seqs, block_size=16, num_heads=8, num_kv_heads=num_kv_heads,
                             head_dim=64, dtype=query_dtype, seed=num_kv_heads)
    key_cache = kv_quant.quantize(batch.key_cache, K_SCALE, dtype)
    value_cache = kv_quant.quantize(batch.value_cache, V_SCALE, dtype)
    flat = (-1, num_kv_heads, 64)
    rows = batch.slot_mapping
    k_new = batch.key_cache.view(flat)[rows]  # written by the backend, quantized
    v_new = batch.value_cache.view(flat)[rows]
    key_cache.view(torch.uint8).view(flat)[rows] = 0x7E  # anything but what belongs there
    value_cache.view(torch.uint8).view(flat)[rows] = 0x7E
    batch.contexts = [(kv_quant.dequantize(kv_quant.quantize(k, K_SCALE, dtype), K_SCALE,
                                           torch.float32),
                       kv_quant.dequantize(kv_quant.quantize(v, V_SCALE, dtype), V_SCALE,
                                           torch.float32)) for k, v in batch.contexts]
    batch.key_cache, batch.value_cache = key_cache, value_cache
    return batch, k_new, v_new


BACKENDS = {"torch": TorchAttentionBackend, "cpu": CPUAttentionBackend,
            "triton": TritonAttentionBackend}
SEQS = [(1, 1), (31, 1), (64, 1), (7, 7), (40, 13), (70, 3)]  # decodes first, as the runner
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("backend_name", list(BACKENDS))
def test_backend_over_fp8_cache(backend_name, dtype, query_dtype):
    """A step's writes, then decodes and prefill chunks (the C++ kernel's and the
    matmul path's, Triton's decode and prefill kernels) over an fp8 cache with scales."""
    num_kv_heads = 2
    batch, k_new, v_new = _fp8_batch(dtype, query_dtype, SEQS, num_kv_heads)
    backend = BACKENDS[backend_name](num_kv_heads)
    seq_lens, query_lens = [s for s, _ in SEQS], [q for _, q in SEQS]
    num_decodes = 3
    to = dict(device="cpu" if backend_name == "cpu" else DEVICE)
    metadata = AttentionMetadata(
        slot_mapping=batch.slot_mapping.to(**to), query_start_loc=batch.query_start_loc.to(**to),
        seq_lens=batch.seq_lens.to(**to), block_tables=batch.block_tables.to(**to),
        num_decodes=num_decodes, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        backend=backend, plan=backend.plan(batch.block_tables.to(**to), seq_lens, query_lens,
                                           num_decodes, 16))

    out = backend.forward(batch.query.to(**to), k_new.to(**to), v_new.to(**to),
                          (batch.key_cache.to(**to), batch.value_cache.to(**to)), metadata,
                          batch.scale, k_scale=K_SCALE, v_scale=V_SCALE)

    torch.testing.assert_close(out.cpu().double(), batch.expected(), **TOLERANCE[query_dtype])


@pytest.mark.parametrize("dtype", FP8)
def test_block_moves_copy_fp8_bytes(dtype):
    """Copy-on-write (reference and Triton) and swaps move an fp8 pool's bytes unchanged."""
    gen = torch.Generator().manual_seed(0)
    shape = (2, 2, 6, 4, 2, 8)  # [layers, K/V, blocks, block_size, kv heads, head_dim]
    pool = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).view(dtype)
    mapping = torch.tensor([[0, 3], [5, 1]])
    expected = pool.view(torch.uint8).clone()
    expected[:, :, [3, 1]] = expected[:, :, [0, 5]]
    copies = [pool.clone().to(DEVICE), pool.clone().to(DEVICE)]

    reference.copy_blocks(copies[0], mapping.to(DEVICE))
    cache_ops.copy_blocks(copies[1], mapping.to(DEVICE))
    cpu_pool = torch.zeros(shape, dtype=dtype)
    swap_blocks(copies[0], cpu_pool, torch.tensor([[3, 0], [1, 2]]))
    swap_blocks(cpu_pool, copies[0], torch.tensor([[0, 4], [2, 2]]))

    assert torch.equal(copies[1].view(torch.uint8).cpu(), expected)
    expected[:, :, [4, 2]] = expected[:, :, [3, 1]]
    assert torch.equal(copies[0].view(torch.uint8).cpu(), expected)
