"""The CPU weight-only quantized GEMM (kernels/csrc/cpu_quant_gemm.cpp) against the float
weight it stands for: W = q * scale + offset per group, over 4- and 8-bit integers
and float8_e4m3 values, group sizes, offsets or none, output sizes that are not a
multiple of the 32-feature blocks, and row counts around the kernel's tile of rows."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels import cpu_kernels
from pagedserve.model.quantized_rows import QuantizedRows
from pagedserve.worker.layers.quantized import QuantizedWeight

pytestmark = pytest.mark.skipif(not cpu_kernels.usable(),
                                reason="the CPU kernels need a C++ compiler")


def _rows(n: int, k: int, group: int, bits, offsets: bool, half: bool = False, seed: int = 0
          ) -> QuantizedRows:
    """Random weights; `half`: scales and offsets that float16 holds exactly (GGUF's)."""
    gen = torch.Generator().manual_seed(seed)
    if bits == 4:
        q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    elif bits == "fp8":  # every finite e4m3 value, subnormals and both zeros among them
        q = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.uint8)
        q[(q & 0x7F) == 0x7F] = 0x80  # NaN: never stored
        q, bits = q.view(torch.float8_e4m3fn), 8
    else:
        q = torch.randint(-128, 128, (n, k), generator=gen).to(torch.int8)
    scales = torch.rand(n, k // group, generator=gen) * 0.02
    offset = torch.randn(n, k // group, generator=gen) * 0.05 if offsets else None
    if half:
        scales = scales.half().float()
        offset = None if offset is None else offset.half().float()
    return QuantizedRows(q, scales, offset, bits, group)


CASES = [  # out features, in features, group, bits, offsets, float16 scales
    (64, 128, 32, 4, True, True),  # GGUF Q4_1
    (50, 96, 32, 4, True, False),  # out features padded to 64
    (96, 256, 128, 4, False, False),
    (33, 64, 32, 8, False, True),  # GGUF Q8_0
    (128, 512, 16, 8, True, False),
    (40, 128, 128, "fp8", False, False),  # FP8 per channel: one group of K
    (64, 256, 128, "fp8", True, True),
]


@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13])
@pytest.mark.parametrize("n, k, group, bits, offsets, half", CASES)
def test_equals_the_float_weight(n, k, group, bits, offsets, half, rows):
    weight = _rows(n, k, group, bits, offsets, half)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    packed = QuantizedWeight(weight)
    expected = x.double() @ weight.dequantize().double().T
    got = packed.linear(x, None)
    assert got.shape == (rows, n)
    # Float32 sums in another order: a few ulps of the largest output.
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5 * expected.abs().max())


@pytest.mark.parametrize("n, k, group, bits, offsets, half", CASES)
def test_packing_round_trips_and_rows_are_looked_up(n, k, group, bits, offsets, half):
    weight = _rows(n, k, group, bits, offsets, half, seed=1)
    packed = QuantizedWeight(weight)
    assert torch.equal(packed.dense(), weight.dequantize())
    ids = torch.tensor([0, n - 1, n // 2, 17 % n])
    assert torch.equal(packed.rows(ids), weight.dequantize()[ids])
    # Bits per weight as stored: 4 or 8, plus the scales (and offsets) per group, in
    # float16 where it holds them exactly, else float32.
    assert packed.scales.dtype == (torch.float16 if half else torch.float32)
    per_group = (2 if half else 4) * (2 if offsets else 1)
    assert packed.nbytes == -(-n // 32) * 32 * (k * weight.bits // 8 + k // group * per_group)


def test_a_bias_is_added_and_bfloat16_activations_come_back_as_bfloat16():
    weight = _rows(64, 64, 32, 4, True)
    packed = QuantizedWeight(weight)
    x = torch.randn(3, 64)
    bias = torch.randn(64)
    torch.testing.assert_close(packed.linear(x, bias), x @ weight.dequantize().T + bias,
                               rtol=1e-5, atol=1e-5)
    assert packed.linear(x.bfloat16(), None).dtype == torch.bfloat16


def test_rows_of_mixed_bits_and_groups_are_joined_at_the_widest_and_finest():
    four = _rows(32, 64, 32, 4, True, seed=2)
    eight = _rows(32, 64, 16, 8, False, seed=3)
    joined = QuantizedRows.cat([four, eight])
    assert (joined.bits, joined.group, joined.q.dtype) == (8, 16, torch.int8)
    assert torch.equal(joined.dequantize(), torch.cat([four.dequantize(), eight.dequantize()]))


def test_bad_inputs_are_refused_naming_them():
    weight = QuantizedWeight(_rows(32, 64, 32, 4, True))
    kernel = cpu_kernels.extension().quant_linear
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="x must be a contiguous"):
        kernel(x.double(), weight.qweight, weight.scales, weight.offsets, "int4", 32)
    with pytest.raises(RuntimeError, match="qweight must be packed"):
        kernel(torch.randn(2, 32), weight.qweight, weight.scales, weight.offsets, "int4", 32)
    with pytest.raises(RuntimeError, match="format must be int4, int8 or fp8_e4m3"):
        kernel(x, weight.qweight, weight.scales, weight.offsets, "int3", 32)
    with pytest.raises(RuntimeError, match="offsets must be shaped like scales, in their dtype"):
        kernel(x, weight.qweight, weight.scales, weight.offsets.half(), "int4", 32)
    with pytest.raises(RuntimeError, match="out_features=40"):
        kernel(x, weight.qweight, weight.scales, weight.offsets, "int4", 40)
    with pytest.raises(ValueError, match="4-bit values must lie in 0..15"):
        cpu_kernels.pack_quantized(torch.full((32, 32), 16), torch.ones(32, 1), None, "int4")


def test_columns_are_selected_on_groups_or_inside_one():
    weight = _rows(32, 256, 64, 4, True, seed=4)
    dense = weight.dequantize()
    part = weight.select(slice(8, 24), slice(64, 192))
    assert part.group == 64 and torch.equal(part.dequantize(), dense[8:24, 64:192])
    inside = weight.select(slice(None), slice(16, 48))  # a per-channel scale split by TP
    assert inside.group == 32 and torch.equal(inside.dequantize(), dense[:, 16:48])
    with pytest.raises(ValueError, match="columns 32..160 cut a group of 64"):
        weight.select(slice(None), slice(32, 160))


def test_float8_and_integer_parts_are_not_joined():
    with pytest.raises(ValueError, match="float8 and integer parts"):
        QuantizedRows.cat([_rows(32, 64, 32, 4, True), _rows(32, 64, 64, "fp8", False)])
