"""Batched LoRA for a batch that mixes adapters: shrink (x A^T) then expand (h B^T).

The base projection runs once for the whole batch; these add each token's
adapter on top, indexed by its slot in the stacked, preallocated weights:

    a_stack: [num_slots, max_rank, in_features]    adapters of smaller rank are zero-padded
    b_stack: [num_slots, out_features, max_rank]
    slots:   [num_tokens] int, the token's adapter slot, NO_ADAPTER (-1) for none (a base request)

    h = lora_shrink(x, a_stack, slots, scaling)     [num_tokens, max_rank], float32
    lora_expand(y, h, b_stack, slots)               y[t] += h[t] B[slots[t]]^T, in place

One program per token and output block (Punica's BGMV). Zero padding makes a
smaller rank exact, so adapters of any rank up to max_rank share one launch.
`y` may be a column slice of a fused projection's output (q, k or v of
qkv_proj), which is how a request adapts q and v but not k.

When a step's tokens are sorted by slot, each adapter's tokens form a few
runs (segments), and `sgmv_shrink` / `sgmv_expand` (Punica's SGMV) compute a
tile of rows of one segment at a time with tensor-core matmuls: one adapter's
weights are read once per tile instead of once per token, which is what a
prefill of many tokens needs. A segment is (first row, rows, slot):

    segments = (starts [G] int32, lengths [G] int32, slots [G] int32), max_length
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.kernels.checks import check_launchable, check_tensor
from pagedserve.kernels.common import dot, dot_in_f32

LORA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The slot index of a token under no adapter (a base request): the kernels leave its row
# alone. The kernels test `slot >= 0`, so it must stay negative.
NO_ADAPTER = -1


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, slots_ptr, scaling_ptr, out_ptr,
                   stride_xt, stride_as, stride_ar, stride_ot,
                   IN_FEATURES: tl.constexpr, RANK: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    num_k = tl.where(slot >= 0, IN_FEATURES, 0)  # NO_ADAPTER: a base request, whose h is zero
    slot = tl.maximum(slot, 0)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, IN_FEATURES, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < num_k
        x = tl.load(x_ptr + token * stride_xt + offs_k, mask=in_k, other=0.0)
        a = tl.load(a_ptr + slot * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :],
                    mask=(offs_r < RANK)[:, None] & in_k[None, :], other=0.0)
        acc += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    scale = tl.load(scaling_ptr + slot)  # slot was clamped: in range
    tl.store(out_ptr + token * stride_ot + offs_r, acc * scale, mask=offs_r < RANK)


@triton.jit
def _expand_kernel(y_ptr, h_ptr, b_ptr, slots_ptr,
                   stride_yt, stride_ht, stride_bs, stride_bn,
                   OUT_FEATURES: tl.constexpr, RANK: tl.constexpr,
                   BLOCK_N: tl.constexpr, RANK_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RANK_PAD)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    num_n = tl.where(slot >= 0, OUT_FEATURES, 0)  # NO_ADAPTER: a base request's row is left alone
    slot = tl.maximum(slot, 0)
    in_n = offs_n < num_n
    h = tl.load(h_ptr + token * stride_ht + offs_r, mask=offs_r < RANK, other=0.0)
    b = tl.load(b_ptr + slot * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :],
                mask=in_n[:, None] & (offs_r < RANK)[None, :], other=0.0)
    delta = tl.sum(b.to(tl.float32) * h[None, :], axis=1)
    y = tl.load(y_ptr + token * stride_yt + offs_n, mask=in_n, other=0.0)
    tl.store(y_ptr + token * stride_yt + offs_n, (y.to(tl.float32) + delta).to(y.dtype),
             mask=in_n)


def _check_slots(slots: torch.Tensor, num_tokens: int, num_slots: int,
                 device: torch.device) -> None:
    check_tensor("slots", slots, ndim=1, dtypes=(torch.int32, torch.int64), device=device)
    if slots.shape[0] != num_tokens:
        raise ValueError(f"slots has {slots.shape[0]} entries for {num_tokens} tokens")
    # On a GPU this check would wait for the device; there the caller's indices are trusted.
    if device.type == "cpu" and num_tokens and not bool(((slots >= NO_ADAPTER)
                                                         & (slots < num_slots)).all()):
        raise ValueError(f"slots must be NO_ADAPTER ({NO_ADAPTER}) or below "
                         f"num_slots={num_slots}, got {slots.min().item()}..{slots.max().item()}")


def _check_shrink(x: torch.Tensor, a_stack: torch.Tensor,
                  scaling: torch.Tensor) -> tuple[int, int, int]:
    check_tensor("x", x, ndim=2, dtypes=LORA_DTYPES)
    check_tensor("a_stack", a_stack, ndim=3, dtypes=(x.dtype,), device=x.device)
    check_tensor("scaling", scaling, ndim=1, dtypes=(torch.float32,), device=x.device)
    num_slots, rank, in_features = a_stack.shape
    if in_features != x.shape[1]:
        raise ValueError(f"a_stack takes {in_features} input features, x has {x.shape[1]}")
    if scaling.shape[0] != num_slots:
        raise ValueError(f"scaling has {scaling.shape[0]} entries for {num_slots} slots")
    return num_slots, rank, in_features


def _check_expand(y: torch.Tensor, h: torch.Tensor,
                  b_stack: torch.Tensor) -> tuple[int, int, int]:
    check_tensor("y", y, ndim=2, dtypes=LORA_DTYPES)
    check_tensor("h", h, ndim=2, dtypes=(torch.float32,), device=y.device)
    check_tensor("b_stack", b_stack, ndim=3, dtypes=(y.dtype,), device=y.device)
    num_slots, out_features, rank = b_stack.shape
    if out_features != y.shape[1]:
        raise ValueError(f"b_stack gives {out_features} output features, y has {y.shape[1]}")
    if tuple(h.shape) != (y.shape[0], rank):
        raise ValueError(f"h must be [{y.shape[0]}, {rank}] (tokens, max_rank), "
                         f"got {list(h.shape)}")
    return num_slots, out_features, rank


def lora_shrink(x: torch.Tensor, a_stack: torch.Tensor, slots: torch.Tensor,
                scaling: torch.Tensor) -> torch.Tensor:
    """h[t] = scaling[s] * x[t] A[s]^T for s = slots[t], zero where s is NO_ADAPTER.

    x: [num_tokens, in_features]; a_stack: [num_slots, max_rank, in_features] of
    x's dtype; scaling: [num_slots] float32. Returns [num_tokens, max_rank] float32.
    """
    num_slots, rank, in_features = _check_shrink(x, a_stack, scaling)
    _check_slots(slots, x.shape[0], num_slots, x.device)
    check_launchable(x.device)
    out = torch.empty(x.shape[0], rank, dtype=torch.float32, device=x.device)
    if x.shape[0] == 0 or rank == 0:
        return out.zero_()
    block_r = min(triton.next_power_of_2(rank), 64)
    grid = (x.shape[0], triton.cdiv(rank, block_r))
    _shrink_kernel[grid](x, a_stack, slots, scaling, out,
                         x.stride(0), a_stack.stride(0), a_stack.stride(1), out.stride(0),
                         IN_FEATURES=in_features, RANK=rank, BLOCK_R=block_r,
                         BLOCK_K=min(triton.next_power_of_2(in_features), 128))
    return out


def lora_expand(y: torch.Tensor, h: torch.Tensor, b_stack: torch.Tensor,
                slots: torch.Tensor) -> None:
    """y[t] += h[t] B[s]^T for s = slots[t], in place; rows whose slot is NO_ADAPTER are
    untouched.

    y: [num_tokens, out_features], rows may be strided (a column slice of a
    fused output); h: [num_tokens, max_rank] float32 (from lora_shrink);
    b_stack: [num_slots, out_features, max_rank] of y's dtype.
    """
    num_slots, out_features, rank = _check_expand(y, h, b_stack)
    _check_slots(slots, y.shape[0], num_slots, y.device)
    check_launchable(y.device)
    if y.shape[0] == 0 or rank == 0:
        return
    block_n = min(triton.next_power_of_2(out_features), 128)
    grid = (y.shape[0], triton.cdiv(out_features, block_n))
    _expand_kernel[grid](y, h, b_stack, slots, y.stride(0), h.stride(0), b_stack.stride(0),
                         b_stack.stride(1), OUT_FEATURES=out_features, RANK=rank,
                         BLOCK_N=block_n, RANK_PAD=triton.next_power_of_2(rank))


@triton.jit
def _segment_rows(starts_ptr, lengths_ptr, slots_ptr, first, BLOCK_M: tl.constexpr):
    """Rows first .. first + BLOCK_M - 1 of this program's segment: their indices, which
    are in it, and the segment's slot."""
    segment = tl.program_id(0)
    offsets = first + tl.arange(0, BLOCK_M)
    rows = tl.load(starts_ptr + segment).to(tl.int64) + offsets
    return rows, offsets < tl.load(lengths_ptr + segment), tl.load(slots_ptr + segment).to(tl.int64)


@triton.jit
def _sgmv_shrink_kernel(x_ptr, a_ptr, starts_ptr, lengths_ptr, slots_ptr, scaling_ptr, out_ptr,
                        stride_xt, stride_as, stride_ar, stride_ot,
                        IN_FEATURES: tl.constexpr, RANK: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    first = tl.program_id(1) * BLOCK_M
    if first < tl.load(lengths_ptr + tl.program_id(0)):
        rows, in_m, slot = _segment_rows(starts_ptr, lengths_ptr, slots_ptr, first, BLOCK_M)
        offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
        in_r = offs_r < RANK
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, IN_FEATURES, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            in_k = offs_k < IN_FEATURES
            x = tl.load(x_ptr + rows[:, None] * stride_xt + offs_k[None, :],
                        mask=in_m[:, None] & in_k[None, :], other=0.0)
            a = tl.load(a_ptr + slot * stride_as + offs_r[None, :] * stride_ar + offs_k[:, None],
                        mask=in_k[:, None] & in_r[None, :], other=0.0)  # [BLOCK_K, BLOCK_R]
            acc += dot(x, a, DOT_F32)
        scale = tl.load(scaling_ptr + slot)
        tl.store(out_ptr + rows[:, None] * stride_ot + offs_r[None, :], acc * scale,
                 mask=in_m[:, None] & in_r[None, :])


@triton.jit
def _sgmv_expand_kernel(y_ptr, h_ptr, b_ptr, starts_ptr, lengths_ptr, slots_ptr,
                        stride_yt, stride_ht, stride_bs, stride_bn,
                        OUT_FEATURES: tl.constexpr, RANK: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, RANK_PAD: tl.constexpr):
    first = tl.program_id(1) * BLOCK_M
    if first < tl.load(lengths_ptr + tl.program_id(0)):
        rows, in_m, slot = _segment_rows(starts_ptr, lengths_ptr, slots_ptr, first, BLOCK_M)
        offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_n = offs_n < OUT_FEATURES
        offs_r = tl.arange(0, RANK_PAD)
        in_r = offs_r < RANK
        h = tl.load(h_ptr + rows[:, None] * stride_ht + offs_r[None, :],
                    mask=in_m[:, None] & in_r[None, :], other=0.0)  # [BLOCK_M, RANK_PAD] fp32
        b = tl.load(b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None],
                    mask=in_r[:, None] & in_n[None, :], other=0.0)  # [RANK_PAD, BLOCK_N]
        delta = dot(h, b.to(tl.float32), True)  # h is float32 already: kept exact
        mask = in_m[:, None] & in_n[None, :]
        pointers = y_ptr + rows[:, None] * stride_yt + offs_n[None, :]
        y = tl.load(pointers, mask=mask, other=0.0)
        tl.store(pointers, (y.to(tl.float32) + delta).to(y.dtype), mask=mask)


Segments = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # starts, lengths, slots


def _check_segments(segments: Segments, max_length: int, num_tokens: int,
                    device: torch.device) -> None:
    starts, lengths, slots = segments
    for name, tensor in (("starts", starts), ("lengths", lengths), ("segment slots", slots)):
        check_tensor(name, tensor, ndim=1, dtypes=(torch.int32,), device=device)
        if tensor.shape[0] != starts.shape[0]:
            raise ValueError(f"{name} has {tensor.shape[0]} entries for {starts.shape[0]} "
                             "segments")
    if max_length < 0:
        raise ValueError(f"max_length must be >= 0, got {max_length}")
    # On a GPU these checks would wait for the device; there the caller's segments are trusted.
    if device.type == "cpu" and starts.numel():
        if bool((starts < 0).any()) or bool((starts + lengths > num_tokens).any()):
            raise ValueError(f"segments reach past the {num_tokens} tokens")
        if int(lengths.max()) > max_length:
            raise ValueError(f"a segment has {int(lengths.max())} rows, over "
                             f"max_length={max_length}")


def sgmv_shrink(x: torch.Tensor, a_stack: torch.Tensor, segments: Segments, max_length: int,
                scaling: torch.Tensor) -> torch.Tensor:
    """lora_shrink over segments: rows of a segment use its slot; rows outside any are zero."""
    num_slots, rank, in_features = _check_shrink(x, a_stack, scaling)
    _check_segments(segments, max_length, x.shape[0], x.device)
    check_launchable(x.device)
    out = torch.zeros(x.shape[0], rank, dtype=torch.float32, device=x.device)
    if not segments[0].numel() or max_length == 0 or rank == 0:
        return out
    block_m = 16 if max_length <= 16 else 32
    block_r = min(max(triton.next_power_of_2(rank), 16), 64)
    grid = (segments[0].shape[0], triton.cdiv(max_length, block_m), triton.cdiv(rank, block_r))
    _sgmv_shrink_kernel[grid](x, a_stack, *segments, scaling, out, x.stride(0),
                              a_stack.stride(0), a_stack.stride(1), out.stride(0),
                              IN_FEATURES=in_features, RANK=rank, BLOCK_M=block_m,
                              BLOCK_R=block_r, BLOCK_K=64, DOT_F32=dot_in_f32(x.dtype))
    return out


def sgmv_expand(y: torch.Tensor, h: torch.Tensor, b_stack: torch.Tensor, segments: Segments,
                max_length: int) -> None:
    """lora_expand over segments, in place; rows outside any segment are untouched."""
    num_slots, out_features, rank = _check_expand(y, h, b_stack)
    _check_segments(segments, max_length, y.shape[0], y.device)
    check_launchable(y.device)
    if not segments[0].numel() or max_length == 0 or rank == 0:
        return
    block_m = 16 if max_length <= 16 else 32
    block_n = min(max(triton.next_power_of_2(out_features), 16), 64)
    grid = (segments[0].shape[0], triton.cdiv(max_length, block_m),
            triton.cdiv(out_features, block_n))
    _sgmv_expand_kernel[grid](y, h, b_stack, *segments, y.stride(0), h.stride(0),
                              b_stack.stride(0), b_stack.stride(1), OUT_FEATURES=out_features,
                              RANK=rank, BLOCK_M=block_m, BLOCK_N=block_n,
                              RANK_PAD=max(triton.next_power_of_2(rank), 16))
