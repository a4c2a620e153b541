"""The quantized-weight GEMMs (kernels/quant_gemm.py) against the torch reference
(kernels/reference.py's quant_linear): int4 with and without offsets, int8 and
fp8_e4m3 codes; groups of 32 and 128 and one per channel; 1, 5 and 64 rows;
48 output features (less than a 64-wide tile) and, per channel, 196 input
features (not a multiple of a tile, nor of int4's 8 codes a word); float32,
bfloat16 and float16 activations. And fp8_linear: its Triton fallback here, its
torch._scaled_mm path through torch's CPU implementation, and on a GPU of
compute capability 8.9 or more, through CUDA's.

Tolerances. The kernel sums each group's products of x and the raw codes, then
scales the sum; the reference dequantizes the weight first and sums x times it:
the same real number, float32 roundings in another order, a few ulps of the
largest partial sum. ACCUMULATION bounds that by 1e-5 (about 170 float32 ulps) times
`magnitude`, the reference's result on |x|, |q * scale| and |offset|, which no
partial sum can exceed. bfloat16 and float16 x: x's values and the codes are
exact in float32, so the only further error is the output's rounding to x's
dtype: OUTPUT_ROUNDING, relative. float16: half a unit in the last place, 2^-11,
doubled. bfloat16: a whole unit, 2^-7, because Triton's interpreter (3.9,
`cast_impl`) converts float32 to bfloat16 by truncation, not to nearest as
compiled Triton does (there half of this would do). Scales and offsets stay
float32 in the kernel's layout, so they add no rounding.
"""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels import quant_gemm, reference
from pagedserve.kernels.checks import interpreting
from pagedserve.kernels.quant_gemm import fp8_linear, fp8_supported, pack, quant_matmul, unpack

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not interpreting() else "cpu")
N = 48  # output features: fewer than a tile's 64, so the column mask is used
ACCUMULATION = 1e-5
OUTPUT_ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def _codes(fmt: str, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Random q: every int4 code, every int8, every finite e4m3 value (subnormals and
    both zeros among them)."""
    if fmt == "int4":
        return torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    if fmt == "int8":
        return torch.randint(-128, 128, (n, k), generator=gen).to(torch.int8)
    q = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.uint8)
    q[(q & 0x7F) == 0x7F] = 0x80  # NaN: never stored
    return q.view(torch.float8_e4m3fn)


def _weight(fmt: str, k: int, group: int, offsets: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = _codes(fmt, N, k, gen)
    scales = torch.rand(N, k // group, generator=gen) * 0.02 + 1e-3
    offset = torch.randn(N, k // group, generator=gen) * 0.05 if offsets else None
    return q, scales, offset


def _expect_close(y: torch.Tensor, x: torch.Tensor, q, scales, offsets, group: int) -> None:
    """y (x's dtype) against the float32 reference, within the tolerances above."""
    expected = reference.quant_linear(x, q, scales, offsets, group)
    magnitude = reference.quant_linear(
        x.abs(), q.float().abs(), scales, None if offsets is None else offsets.abs(), group)
    assert y.dtype == x.dtype and y.shape == expected.shape
    torch.testing.assert_close(y.float(), expected, rtol=OUTPUT_ROUNDING[x.dtype],
                               atol=ACCUMULATION * float(magnitude.max()))


WEIGHTS = [  # fmt, offsets
    ("int4", True),  # GPTQ / AWQ: offset = -zero * scale
    ("int4", False),
    ("int8", False),
    ("fp8_e4m3", False),
]
GROUPS = [(256, 32), (256, 128), (196, 196)]  # in features, group: the last one per channel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k, group", GROUPS)
@pytest.mark.parametrize("fmt, offsets", WEIGHTS)
def test_quant_matmul_equals_the_reference(fmt, offsets, k, group, dtype):
    q, scales, offset = _weight(fmt, k, group, offsets)
    weight = pack(q.to(DEVICE), scales.to(DEVICE), None if offset is None else offset.to(DEVICE),
                  fmt)
    assert weight.group == group
    for rows in (1, 5, 64):  # a decode step, a few, a prefill's tile
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
        y = quant_matmul(x.to(DEVICE), weight)
        _expect_close(y.cpu(), x, q, scales, offset, group)


@pytest.mark.parametrize("fmt, offsets", WEIGHTS)
def test_unpack_gives_back_the_float_weight(fmt, offsets):
    k, group = 196, 196  # int4's last word half padding
    q, scales, offset = _weight(fmt, k, group, offsets, seed=1)
    weight = pack(q, scales, offset, fmt)
    expected = q.float() * scales.repeat_interleave(group, dim=1)
    if offset is not None:
        expected += offset.repeat_interleave(group, dim=1)
    assert torch.equal(unpack(weight), expected)
    assert weight.scales.dtype == torch.float32 and weight.scales.shape == (k // group, N)
    if fmt == "int4":  # 8 codes a word, K padded to a whole word
        assert weight.codes.dtype == torch.int32 and weight.codes.shape == (25, N)


def test_float16_strided_rows_many_rows_and_none():
    """float16 x as a column slice of a wider tensor; 100 rows (two tiles of rows, the
    prefill tile shape); and no rows at all."""
    k, group = 256, 64
    q, scales, offset = _weight("int4", k, group, True, seed=2)
    weight = pack(q.to(DEVICE), scales.to(DEVICE), offset.to(DEVICE), "int4")
    wide = torch.randn(100, k + 40, generator=torch.Generator().manual_seed(3)).half()
    x = wide[:, 8:8 + k]
    _expect_close(quant_matmul(x.to(DEVICE), weight).cpu(), x, q, scales, offset, group)
    assert quant_matmul(torch.zeros(0, k, device=DEVICE), weight).shape == (0, N)


@pytest.mark.parametrize("weight_scale_shape", [(N,), (N, 1), ()])
def test_fp8_linear_without_scaled_mm_runs_the_triton_kernel_on_the_same_bytes(
        weight_scale_shape):
    if fp8_supported(DEVICE):
        pytest.skip("this device multiplies fp8 through torch._scaled_mm")
    k = 196
    gen = torch.Generator().manual_seed(4)
    weight = _codes("fp8_e4m3", N, k, gen)
    weight_scale = torch.rand(weight_scale_shape, generator=gen) * 0.01 + 1e-3
    per_row = weight_scale.reshape(-1, 1).expand(N, 1)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, k, generator=gen).to(dtype)
        # Weight-only: activations unquantized, so the static input scale changes nothing.
        y = fp8_linear(x.to(DEVICE), weight.to(DEVICE), weight_scale.to(DEVICE),
                       input_scale=torch.tensor(0.5, device=DEVICE))
        _expect_close(y.cpu(), x, weight, per_row, None, k)


def _emulated_w8a8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   input_scale: torch.Tensor | None) -> torch.Tensor:
    """What a W8A8 GEMM computes, in float32: x quantized to e4m3 per token by its absolute
    maximum (or by input_scale), times the dequantized weight."""
    x = x.float()
    if input_scale is None:
        x_scale = (x.abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=1.0 / (448.0 * 512))
    else:
        x_scale = input_scale.float().reshape(1, 1)
    x_q = (x / x_scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * x_scale
    return x_q @ (weight.float() * weight_scale.float().reshape(-1, 1)).t()


def _check_scaled_mm(linear, device: torch.device) -> None:
    """`linear` (fp8_linear or fp8_scaled_mm) on `device` against _emulated_w8a8, over
    per-token and static activation scales, per-channel and per-tensor weight scales,
    and bfloat16 (the fused row-wise output), float16 and float32 x."""
    k, n = 128, 64  # _scaled_mm wants K and N multiples of 16
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(n, k, generator=gen).clamp(-6, 6).to(torch.float8_e4m3fn)
    for weight_scale in (torch.rand(n, generator=gen) * 0.01 + 1e-3, torch.tensor(0.004)):
        for input_scale in (None, torch.tensor(0.02)):
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                x = torch.randn(7, k, generator=gen).to(dtype)
                x[3] = 0  # a row of zeros: the per-token scale's floor
                y = linear(x.to(device), weight.to(device), weight_scale.to(device),
                           None if input_scale is None else input_scale.to(device))
                expected = _emulated_w8a8(x, weight, weight_scale, input_scale)
                magnitude = _emulated_w8a8(x.abs(), weight.float().abs(), weight_scale,
                                           input_scale).abs()
                assert y.dtype == dtype and y.shape == (7, n)
                # The same quantized operands: the tolerances above.
                torch.testing.assert_close(y.float().cpu(), expected,
                                           rtol=OUTPUT_ROUNDING[dtype],
                                           atol=ACCUMULATION * float(magnitude.max()))


def _cpu_scaled_mm() -> bool:
    """Whether this torch multiplies float8 on the CPU (2.13 does; older ones may not)."""
    one = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(one, one.t(), scale_a=torch.tensor(1.0), scale_b=torch.tensor(1.0),
                         out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(not _cpu_scaled_mm(), reason="this torch has no CPU torch._scaled_mm")
def test_fp8_scaled_mm_through_torch_cpu_scaled_mm():
    """The _scaled_mm path's quantization, scale shapes and layouts, run by torch's own
    CPU _scaled_mm (CUDA's adds its restrictions: see the test below)."""
    _check_scaled_mm(quant_gemm.fp8_scaled_mm, torch.device("cpu"))


@pytest.mark.skipif(not (torch.cuda.is_available() and fp8_supported("cuda")),
                    reason="torch._scaled_mm on CUDA needs compute capability 8.9 or more")
def test_fp8_linear_through_cuda_scaled_mm():
    _check_scaled_mm(fp8_linear, torch.device("cuda"))


def _pack_args(**changes):
    q, scales, offset = _weight("int4", 256, 32, True)
    args = dict(q=q, scales=scales, offsets=offset, fmt="int4") | changes
    return args


@pytest.mark.parametrize("changes, words", [
    (dict(group=48), "group=48 must divide in_features K=256"),
    (dict(group=8, scales=torch.ones(N, 32), offsets=None), "group=8 must be a multiple of 16"),
    (dict(scales=torch.ones(N, 3), offsets=None), "scales has 3 groups a row, which do not "
                                                  "divide in_features K=256"),
    (dict(scales=torch.ones(N - 1, 8), offsets=None), r"scales must be \[48, 8\]"),
    (dict(offsets=torch.ones(N, 4)), r"offsets has shape \[48, 4\], scales \[48, 8\]"),
    (dict(q=torch.zeros(N, 256, dtype=torch.int8)), "q has dtype int8; expected one of: uint8"),
    (dict(q=torch.full((N, 256), 16, dtype=torch.uint8)), "q holds 16; int4 codes are 0..15"),
    (dict(scales=torch.ones(N, 8, dtype=torch.float64)), "scales has dtype float64"),
    (dict(fmt="int3"), "fmt must be one of int4, int8, fp8_e4m3, got 'int3'"),
])
def test_pack_names_what_it_refuses(changes, words):
    with pytest.raises(ValueError, match=words):
        pack(**_pack_args(**changes))


def test_the_launchers_name_what_they_refuse():
    weight = pack(**_pack_args())
    with pytest.raises(ValueError, match="x has 100 features, the weight takes in_features "
                                         "K=256"):
        quant_matmul(torch.zeros(2, 100), weight)
    with pytest.raises(ValueError, match="x has dtype float64"):
        quant_matmul(torch.zeros(2, 256, dtype=torch.float64), weight)
    with pytest.raises(ValueError, match="x has dtype int32"):
        quant_matmul(torch.zeros(2, 256, dtype=torch.int32), weight)
    x = torch.zeros(2, 64)
    fp8 = torch.zeros(N, 64).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="weight_fp8 has dtype bfloat16"):
        fp8_linear(x, fp8.bfloat16(), torch.ones(N))
    with pytest.raises(ValueError, match=r"one per output feature \(48\), got shape \[47\]"):
        fp8_linear(x, fp8, torch.ones(N - 1))
    with pytest.raises(ValueError, match="weight_scale has dtype float16"):
        fp8_linear(x, fp8, torch.ones(N, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"input_scale must be one .* got shape \[2\]"):
        fp8_linear(x, fp8, torch.ones(N), input_scale=torch.ones(2))
    with pytest.raises(ValueError, match="weight_fp8 takes in_features K=64"):
        fp8_linear(torch.zeros(2, 32), fp8, torch.ones(N))
