"""fp8 values of the KV cache, encoded and decoded with integer ops in Triton kernels.

The kernels see an fp8 cache as its bytes (`.view(torch.uint8)`) and convert
with shifts and masks, not with Triton's fp8 casts, for two reasons:

- Triton's interpreter (TRITON_INTERPRET=1, how the kernels are tested on a
  CPU) rounds float32 -> fp8 wrongly: when rounding carries out of the
  mantissa (126.8 -> 128 in e4m3) it ORs the carry into the exponent bits
  instead of adding it, giving 64 (triton 3.9, `interpreter._convert_float`;
  2-4% of normally distributed values), and it rounds ties up, not to even.
  Its fp8 -> float32 reads are exact.
- Compiled, Triton's float8e4nv needs sm_89 or newer (an A100 is sm_80);
  integer ops run on any GPU.

Both match torch's casts bit for bit (round to nearest, ties to even;
subnormals included), for values already clamped to the format's largest
finite one, as kv_quant.quantize clamps them: FORMAT is kv_quant.FP8Format's
`name`, "e4m3" (float8_e4m3fn) or "e5m2".
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def decode_fp8(bits, FORMAT: tl.constexpr):
    """uint8 codes -> float32. e5m2 is float16's top byte; e4m3's 7 bits below the sign
    sit in float16 three places lower (its exponent bias is 7, not 15: times 2^8).
    Going through float16 keeps subnormal fp8 values off float32's denormals."""
    b = bits.to(tl.int16)
    if FORMAT == "e4m3":
        half = ((b & 0x7F) << 7) | ((b & 0x80) << 8)
        return half.to(tl.float16, bitcast=True).to(tl.float32) * 256.0
    else:
        return (b << 8).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def encode_fp8(x, FORMAT: tl.constexpr):
    """float32 in [-max, max] -> uint8 codes, rounded to nearest even."""
    if FORMAT == "e4m3":
        return _encode(x, 3, 7)
    else:
        return _encode(x, 2, 15)


@triton.jit
def _encode(x, MANTISSA: tl.constexpr, BIAS: tl.constexpr):
    """Normal results: float32's bits with the exponent re-biased, rounded at the last
    fp8 mantissa bit (half a unit less one, plus that bit: ties go to even) and shifted
    down. Subnormal results (|x| < 2^(1 - BIAS)): the float addition |x| + MAGIC rounds
    |x| to the fp8 subnormal step, and the sum's low bits are the code."""
    SHIFT: tl.constexpr = 23 - MANTISSA
    # A float32 whose unit in the last place is the fp8 subnormal step 2^(1 - BIAS - MANTISSA).
    MAGIC: tl.constexpr = (127 - BIAS + SHIFT + 1) << 23
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    magnitude = bits & 0x7FFFFFFF
    rounding = (1 << (SHIFT - 1)) - 1 + ((magnitude >> SHIFT) & 1)
    normal = (magnitude - ((127 - BIAS) << 23) + rounding) >> SHIFT
    magic = tl.full(x.shape, MAGIC, tl.int32).to(tl.float32, bitcast=True)
    subnormal = (magnitude.to(tl.float32, bitcast=True) + magic).to(tl.int32, bitcast=True) - MAGIC
    code = tl.where(magnitude < ((128 - BIAS) << 23), subnormal, normal)
    return (code | sign).to(tl.uint8)
