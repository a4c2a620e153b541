"""GEMMs for weights kept quantized on the GPU: W4A16, W8A16 and FP8 (Triton, torch._scaled_mm).

A weight-only quantized weight (model/quantized_rows.py) stands for

    W[n, k] = q[n, k] * scales[n, k // G] + offsets[n, k // G]      (offsets may be None)

and `pack` lays it out for `quant_matmul`'s kernel, transposed so that output
features are contiguous:

    int4:     codes int32 [ceil(K / 8), N]  word (w, n) holds q[n, 8w + j] in bits 4j .. 4j + 3
    int8:     codes int8  [K, N]
    fp8_e4m3: codes uint8 [K, N]            the float8_e4m3fn bytes
    scales:   float32 [K / G, N]            offsets: like scales, or None

Why N contiguous: a program multiplies a tile x[BLOCK_M, BLOCK_K] by a tile of
codes [BLOCK_K, BLOCK_N], the B operand of tl.dot as it is. Along N a row of
the tile is BLOCK_N * 4 bytes of int32 words (256 for BLOCK_N = 64), so a warp's
loads cover whole 128-byte lines; with K contiguous a 4-bit row would be
BLOCK_K / 2 bytes (32 at BLOCK_K = 64), a quarter of a line. Packing 8 codes
into an int32 along K (GPTQ's layout) keeps the 4-byte loads and lets one load
serve the 8 rows of k that share a word. For the byte formats the two
layouts read the same BLOCK_N- or BLOCK_K-byte runs; they are transposed too so
that one kernel, with one tile shape, reads all three (it takes the codes'
strides, so fp8_linear also runs it on an [N, K] checkpoint tensor as it is).
A group's scales (and offsets) are one contiguous row of N too.

The kernel does not multiply every weight by its scale. Within a group the
scale and offset are constants of the column, so for a K tile t inside group g

    sum_{k in t} x[m, k] W[n, k] = scales[g, n] * (x_t q_t)[m, n] + offsets[g, n] * sum(x_t)[m]

and it multiplies x_t q_t with tl.dot on the codes converted to x's dtype
(exact: 0..15, -128..127 and every e4m3 value are bfloat16 and float16
values), then scales the tile's product in float32. With one group a channel
(G = K, the FP8 checkpoints' scheme) the products accumulate in tl.dot's
accumulator and are scaled once at the end. The weight is never rounded to
bfloat16, as dequantizing before the dot would do, and the per-weight work is
one conversion; the per-tile scaling costs BLOCK_M * BLOCK_N multiply-adds per
BLOCK_K * BLOCK_N weights. So a tile must lie inside one group: G is a multiple
of 16 (BLOCK_K is its largest power-of-two divisor, at most 64), or G = K.

Scales stay float32: they are 4 bytes per group per column, 3% more bytes
than float16 at int4 with G = 128, and the result matches the checkpoint's
float32 weight rather than one with its scales rounded to 11 bits.

fp8 codes are read as bytes and decoded with integer ops (fp8_codec.decode_fp8)
rather than loaded as float8: Triton's interpreter reads float8 exactly, but
compiled, Triton's float8e4nv needs sm_89, and the GPUs older than that are
the ones `fp8_linear` sends here.

`fp8_linear` is the W8A8 path for FP8 checkpoints: on sm_89 and newer
(`fp8_supported`) it quantizes the activations to float8_e4m3fn, per token or
with the checkpoint's static input scale, and multiplies on the tensor cores
with torch._scaled_mm (vLLM's apply_fp8_linear); elsewhere it runs the weight
through the kernel above, activations unquantized.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedserve.kernels.checks import check_launchable, check_tensor
from pagedserve.kernels.common import dot, dot_in_f32
from pagedserve.kernels.fp8_codec import decode_fp8

FORMATS = ("int4", "int8", "fp8_e4m3")
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The dtype of each format's q as `pack` takes it.
Q_DTYPES = {"int4": torch.uint8, "int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
INT4_PER_WORD = 8
MIN_BLOCK_K = 16  # tl.dot's smallest K
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
# vLLM's floor for a dynamic per-token scale: a row of zeros still divides by something.
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)


@dataclass(frozen=True)
class QuantGemmWeight:
    """A quantized weight laid out for `quant_matmul` (the module docstring draws it)."""

    # Each with a leading expert dimension where `stack` made it (fused_moe's experts).
    codes: torch.Tensor  # int4: int32 [ceil(K/8), N]; int8: int8 [K, N]; fp8_e4m3: uint8 [K, N]
    scales: torch.Tensor  # float32 [K // group, N]
    offsets: torch.Tensor | None  # like scales, or None for zero
    fmt: str
    group: int
    in_features: int  # K
    out_features: int  # N


def _check_group(in_features: int, group: int) -> None:
    if group <= 0 or in_features % group:
        raise ValueError(f"group={group} must divide in_features K={in_features}")
    if group != in_features and group % MIN_BLOCK_K:
        raise ValueError(f"group={group} must be a multiple of {MIN_BLOCK_K} (the kernel's "
                         f"smallest K tile) or all of in_features K={in_features}")


def pack(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, fmt: str,
         group: int | None = None) -> QuantGemmWeight:
    """Lay out W = q * scales + offsets (per group of `group` columns) for quant_matmul.

    q: [N, K], uint8 codes 0..15 (int4), int8 (int8) or float8_e4m3fn (fp8_e4m3);
    scales, offsets: [N, K // group], float32 (float16 and bfloat16 are widened).
    group defaults to K // scales.shape[1]. Runs once, at load time: it copies q.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    check_tensor("q", q, ndim=2, dtypes=(Q_DTYPES[fmt],))
    check_tensor("scales", scales, ndim=2, dtypes=SCALE_DTYPES, device=q.device)
    out_features, in_features = q.shape
    num_groups = scales.shape[1]
    if group is None:
        if num_groups == 0 or in_features % num_groups:
            raise ValueError(f"scales has {num_groups} groups a row, which do not divide "
                             f"in_features K={in_features}")
        group = in_features // num_groups
    _check_group(in_features, group)
    if tuple(scales.shape) != (out_features, in_features // group):
        raise ValueError(f"scales must be [{out_features}, {in_features // group}] (N, K // "
                         f"group), got {list(scales.shape)}")
    if offsets is not None:
        check_tensor("offsets", offsets, ndim=2, dtypes=SCALE_DTYPES, device=q.device)
        if offsets.shape != scales.shape:
            raise ValueError(f"offsets has shape {list(offsets.shape)}, scales "
                             f"{list(scales.shape)}")
    if fmt == "int4":
        codes = _pack_int4(q)
    elif fmt == "int8":
        codes = q.t().contiguous()
    else:
        codes = q.view(torch.uint8).t().contiguous()
    return QuantGemmWeight(codes, scales.float().t().contiguous(),
                           None if offsets is None else offsets.float().t().contiguous(),
                           fmt, group, in_features, out_features)


def stack(weights: Sequence[QuantGemmWeight]) -> QuantGemmWeight:
    """A MoE layer's experts of one format, group and shape as one weight for fused_moe:
    codes, scales and offsets gain a leading expert dimension. ValueError where they
    differ."""
    first = weights[0]
    key = (first.fmt, first.group, first.in_features, first.out_features,
           first.offsets is None)
    for index, weight in enumerate(weights):
        other = (weight.fmt, weight.group, weight.in_features, weight.out_features,
                 weight.offsets is None)
        if other != key:
            raise ValueError(f"expert {index} is held as (fmt, group, K, N, no offsets) "
                             f"{other}, expert 0 as {key}")
    return QuantGemmWeight(torch.stack([w.codes for w in weights]),
                           torch.stack([w.scales for w in weights]),
                           None if first.offsets is None
                           else torch.stack([w.offsets for w in weights]),
                           first.fmt, first.group, first.in_features, first.out_features)


def expert(weight: QuantGemmWeight, index: int) -> QuantGemmWeight:
    """Expert `index` of a stacked weight (views: no copy)."""
    return QuantGemmWeight(weight.codes[index], weight.scales[index],
                           None if weight.offsets is None else weight.offsets[index],
                           weight.fmt, weight.group, weight.in_features, weight.out_features)


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] -> int32 words [ceil(K / 8), N], K padded with zero codes. One
    eighth of the columns at a time, so the only copies of the weight are bytes."""
    if q.numel() and int(q.max()) > 15:
        raise ValueError(f"q holds {int(q.max())}; int4 codes are 0..15")
    out_features, in_features = q.shape
    words = -(-in_features // INT4_PER_WORD)
    padded = torch.zeros(out_features, words * INT4_PER_WORD, dtype=torch.uint8, device=q.device)
    padded[:, :in_features] = q
    packed = torch.zeros(words, out_features, dtype=torch.int32, device=q.device)
    for j in range(INT4_PER_WORD):
        # Code j of each word; the top one wraps into the sign bit, as two's complement does.
        packed |= padded[:, j::INT4_PER_WORD].t().to(torch.int32) << (4 * j)
    return packed


def unpack(weight: QuantGemmWeight, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weight [N, K] that `weight` stands for, or its rows `rows` (an
    embedding lookup: [len(rows), K])."""
    k = weight.in_features
    codes, scales, offsets = weight.codes, weight.scales, weight.offsets
    if rows is not None:
        codes, scales = codes[:, rows], scales[:, rows]
        offsets = None if offsets is None else offsets[:, rows]
    if weight.fmt == "int4":
        shifts = torch.arange(0, 32, 4, device=codes.device)
        words = codes.t().to(torch.int64)  # [n, ceil(K/8)]
        q = ((words[:, :, None] >> shifts) & 0xF).flatten(1)[:, :k].float()
    elif weight.fmt == "int8":
        q = codes.t().float()
    else:
        q = codes.t().contiguous().view(torch.float8_e4m3fn).float()
    dense = q * scales.t().repeat_interleave(weight.group, dim=1)
    if offsets is not None:
        dense += offsets.t().repeat_interleave(weight.group, dim=1)
    return dense.contiguous()


@triton.jit
def _load_codes(codes_ptr, offs_k, offs_n, mask, stride_ck, stride_cn, FMT: tl.constexpr):
    """q[offs_n, offs_k] as [BLOCK_K, BLOCK_N]: integers for int4 and int8, float32 for
    fp8_e4m3 (decoded from its bytes)."""
    if FMT == "int4":
        words = tl.load(codes_ptr + (offs_k // 8).to(tl.int64)[:, None] * stride_ck
                        + offs_n[None, :] * stride_cn, mask=mask, other=0)
        q = (words >> ((offs_k % 8) * 4)[:, None]) & 0xF
    else:
        q = tl.load(codes_ptr + offs_k.to(tl.int64)[:, None] * stride_ck
                    + offs_n[None, :] * stride_cn, mask=mask, other=0)
        if FMT == "fp8_e4m3":
            q = decode_fp8(q, "e4m3")
    return q


@triton.jit
def quant_dot(x_rows, in_m, codes_ptr, scales_ptr, offsets_ptr, offs_n, in_n, K, group,
              stride_ck, stride_cn, stride_sg, FMT: tl.constexpr, HAS_OFFSETS: tl.constexpr,
              PER_CHANNEL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    """x W^T for a tile of rows and output features, in float32: x_rows [BLOCK_M, 1] points
    at rows of x (masked by in_m), offs_n [BLOCK_N] at output features (in_n). The loop of
    `quant_matmul`'s kernel, and of fused_moe's for quantized experts."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # PER_CHANNEL with offsets: sum of x
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < K  # only per channel can a tile reach past K
        x = tl.load(x_rows + offs_k[None, :], mask=in_m[:, None] & in_k[None, :], other=0.0)
        q = _load_codes(codes_ptr, offs_k, offs_n, in_k[:, None] & in_n[None, :],
                        stride_ck, stride_cn, FMT)
        # Exact either way. Under DOT_F32 straight to float32: Triton's interpreter turns
        # integers into bfloat16 as raw bits.
        if DOT_F32:
            q = q.to(tl.float32)
        else:
            q = q.to(x.dtype)
        if PER_CHANNEL:  # one scale and offset a column: applied after the loop
            acc += dot(x, q, DOT_F32)
            if HAS_OFFSETS:
                x_sum += tl.sum(x.to(tl.float32), axis=1)
        else:  # the tile lies in one group (BLOCK_K divides it): its scale and offset
            group_row = (k0 // group) * stride_sg
            scale = tl.load(scales_ptr + group_row + offs_n, mask=in_n, other=0.0)
            acc += dot(x, q, DOT_F32) * scale[None, :]
            if HAS_OFFSETS:
                offset = tl.load(offsets_ptr + group_row + offs_n, mask=in_n, other=0.0)
                acc += tl.sum(x.to(tl.float32), axis=1)[:, None] * offset[None, :]
    if PER_CHANNEL:
        acc *= tl.load(scales_ptr + offs_n, mask=in_n, other=0.0)[None, :]
        if HAS_OFFSETS:
            offset = tl.load(offsets_ptr + offs_n, mask=in_n, other=0.0)
            acc += x_sum[:, None] * offset[None, :]
    return acc


@triton.jit
def _quant_matmul_kernel(x_ptr, codes_ptr, scales_ptr, offsets_ptr, y_ptr,
                         M, N, K, group, stride_xm, stride_ck, stride_cn, stride_sg, stride_ym,
                         FMT: tl.constexpr, HAS_OFFSETS: tl.constexpr, PER_CHANNEL: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         DOT_F32: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_n = offs_n < N
    in_m = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = quant_dot(x_rows, in_m, codes_ptr, scales_ptr, offsets_ptr, offs_n, in_n, K, group,
                    stride_ck, stride_cn, stride_sg, FMT, HAS_OFFSETS, PER_CHANNEL,
                    BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32)
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


def k_tile(weight: QuantGemmWeight) -> int:
    """quant_dot's K tile for `weight`: one that divides its group, so that no tile
    straddles two (64 with one group a channel)."""
    if weight.group == weight.in_features:
        return 64
    return min(weight.group & -weight.group, 64)  # the largest power of two dividing it


def _block_sizes(num_rows: int, weight: QuantGemmWeight) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): a decode step's few rows take the smallest tile of rows
    tl.dot allows; a prefill's thousands take 64 rows by 128 columns."""
    block_m = min(max(triton.next_power_of_2(num_rows), 16), 64)
    block_n = 64 if num_rows <= 64 else 128
    return block_m, block_n, k_tile(weight)


def quant_matmul(x: torch.Tensor, weight: QuantGemmWeight) -> torch.Tensor:
    """y = x W^T for the W that `weight` stands for.

    x: [M, K] float16, bfloat16 or float32 (rows may be strided). Returns [M, N] of x's
    dtype, accumulated in float32.
    """
    check_tensor("x", x, ndim=2, dtypes=ACTIVATION_DTYPES, device=weight.codes.device)
    if x.shape[1] != weight.in_features:
        raise ValueError(f"x has {x.shape[1]} features, the weight takes in_features "
                         f"K={weight.in_features}")
    check_launchable(x.device)
    num_rows, out_features = x.shape[0], weight.out_features
    y = torch.empty(num_rows, out_features, dtype=x.dtype, device=x.device)
    if num_rows == 0 or out_features == 0:
        return y
    block_m, block_n, block_k = _block_sizes(num_rows, weight)
    offsets = weight.offsets if weight.offsets is not None else weight.scales  # unread
    grid = (triton.cdiv(out_features, block_n), triton.cdiv(num_rows, block_m))
    _quant_matmul_kernel[grid](
        x, weight.codes, weight.scales, offsets, y,
        num_rows, out_features, weight.in_features, weight.group, x.stride(0),
        weight.codes.stride(0), weight.codes.stride(1), weight.scales.stride(0), y.stride(0),
        FMT=weight.fmt, HAS_OFFSETS=weight.offsets is not None,
        PER_CHANNEL=weight.group == weight.in_features,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_F32=dot_in_f32(x.dtype))
    return y


def fp8_supported(device: torch.device | str) -> bool:
    """Whether torch._scaled_mm multiplies float8 on `device`: CUDA of compute capability
    8.9 (Ada) or newer."""
    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= (8, 9))


def _check_fp8_args(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
                    input_scale: torch.Tensor | None) -> None:
    check_tensor("x", x, ndim=2, dtypes=ACTIVATION_DTYPES)
    check_tensor("weight_fp8", weight_fp8, ndim=2, dtypes=(torch.float8_e4m3fn,),
                 device=x.device)
    out_features, in_features = weight_fp8.shape
    if x.shape[1] != in_features:
        raise ValueError(f"x has {x.shape[1]} features, weight_fp8 takes in_features "
                         f"K={in_features}")
    check_tensor("weight_scale", weight_scale, ndim=weight_scale.dim(), dtypes=(torch.float32,),
                 device=x.device, contiguous_last=False)
    if weight_scale.numel() not in (1, out_features) or weight_scale.dim() > 2:
        raise ValueError(f"weight_scale must be one scale or one per output feature "
                         f"({out_features}), got shape {list(weight_scale.shape)}")
    if input_scale is not None:
        check_tensor("input_scale", input_scale, ndim=input_scale.dim(),
                     dtypes=(torch.float32,), device=x.device, contiguous_last=False)
        if input_scale.numel() != 1:
            raise ValueError(f"input_scale must be one (per-tensor) scale, got shape "
                             f"{list(input_scale.shape)}")


def fp8_linear(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = x (weight_fp8 * weight_scale)^T, for an FP8 checkpoint's linear layer.

    x: [M, K] float16, bfloat16 or float32; weight_fp8: [N, K] float8_e4m3fn;
    weight_scale: float32, one ([] or [1]) or one per output feature ([N] or [N, 1]);
    input_scale: the checkpoint's static activation scale (one float32), or None to
    quantize each token by its own absolute maximum. Returns [M, N] of x's dtype.

    Through torch._scaled_mm where `fp8_supported` (K and N multiples of 16, as it
    needs); elsewhere the weight-only Triton kernel, on the same bytes (no copy) and
    with unquantized activations, so input_scale is unused there.
    """
    _check_fp8_args(x, weight_fp8, weight_scale, input_scale)
    out_features, in_features = weight_fp8.shape
    if (fp8_supported(x.device) and in_features % 16 == 0 and out_features % 16 == 0
            and weight_fp8.is_contiguous()):
        return fp8_scaled_mm(x, weight_fp8, weight_scale, input_scale)
    scales = weight_scale.reshape(1, -1).expand(1, out_features).contiguous()
    view = QuantGemmWeight(weight_fp8.view(torch.uint8).t(), scales, None, "fp8_e4m3",
                           in_features, in_features, out_features)
    return quant_matmul(x, view)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8_e4m3fn [M, K], float32 scales [M, 1]): each row divided by its
    absolute maximum over 448, e4m3's largest value."""
    scale = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=FP8_MIN_SCALE)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_scaled_mm(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
                  input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp8_linear's torch._scaled_mm path, arguments as there; for the devices fp8_supported
    accepts (and torch's own CPU _scaled_mm, which is how it is tested without a GPU).

    One weight scale and a static input scale: one tensor-wise scaled GEMM. Otherwise the
    scales are row-wise (a_scale [M, 1], b_scale [1, N]), which CUDA's kernel fuses only
    into a bfloat16 output; for float16 and float32 x the GEMM runs unscaled into
    float32 and the scales multiply after (vLLM's channel-wise fallback).
    """
    num_rows, out_features = x.shape[0], weight_fp8.shape[0]
    if num_rows == 0:
        return torch.empty(0, out_features, dtype=x.dtype, device=x.device)
    w_t = weight_fp8.t()  # [K, N], column-major as _scaled_mm's second operand must be
    if input_scale is not None:
        x_scale = input_scale.reshape(1, 1)
        x_fp8 = (x.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        if weight_scale.numel() == 1:
            return torch._scaled_mm(x_fp8, w_t, scale_a=x_scale.reshape(()),
                                    scale_b=weight_scale.reshape(()), out_dtype=x.dtype)
        x_scale = x_scale.expand(num_rows, 1).contiguous()
    else:
        x_fp8, x_scale = quantize_fp8_per_token(x)
    w_scale = weight_scale.reshape(1, -1).expand(1, out_features).contiguous()
    if x.dtype == torch.bfloat16:
        return torch._scaled_mm(x_fp8, w_t, scale_a=x_scale, scale_b=w_scale,
                                out_dtype=torch.bfloat16)
    one = torch.ones((), dtype=torch.float32, device=x.device)
    y = torch._scaled_mm(x_fp8, w_t, scale_a=one, scale_b=one, out_dtype=torch.float32)
    return (y * x_scale * w_scale).to(x.dtype)
