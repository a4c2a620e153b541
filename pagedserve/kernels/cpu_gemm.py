"""Linear layers on the CPU through oneDNN, on weights packed once at load.

`F.linear` on the CPU calls MKL's sgemm, which copies the weight into its own
blocked layout on every call; on some CPUs (AMD's, where MKL takes its generic
path) that packing is a large share of a step. oneDNN can do that packing once:
`pack` reorders a weight into the layout its GEMM reads, and `linear` runs on
the packed weight. This is what vLLM's CPU build does.

The ops are private to torch (`torch.ops.mkldnn._reorder_linear_weight`,
`torch.ops.mkldnn._linear_pointwise`, the ones torch.compile uses for CPU
linears, and its float16 check `_is_mkldnn_fp16_supported`). This module is
their only user, so a torch upgrade that renames or removes them breaks one
place: `available()` turns False, the layers keep `F.linear`, and
tests/kernels/test_cpu_gemm.py fails loudly.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)

# The dtypes oneDNN's CPU GEMM takes, and that a model may be served in.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _ops():
    mkldnn = torch.ops.mkldnn
    return mkldnn._reorder_linear_weight.default, mkldnn._linear_pointwise.default


@functools.cache
def available() -> bool:
    """Whether this torch build has oneDNN and both ops, and they compute a linear."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        reorder, pointwise = _ops()
        weight = torch.arange(6, dtype=torch.float32).view(3, 2)
        x = torch.ones(1, 2)
        out = pointwise(x, reorder(weight, None), None, "none", [], "")
        return bool(torch.equal(out, torch.tensor([[1.0, 5.0, 9.0]])))
    except (AttributeError, RuntimeError) as error:
        logger.warning("oneDNN linear ops unavailable in torch %s (%s); CPU linear layers use "
                       "F.linear", torch.__version__, error)
        return False


@functools.cache
def float16_supported() -> bool:
    """Whether oneDNN's float16 GEMM runs on this CPU: it needs avx512_fp16 or
    avx_ne_convert (torch's own check, which the packing op enforces); without
    them, packing a float16 weight raises."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dim() == 2 and weight.dtype in DTYPES
            and available() and (weight.dtype != torch.float16 or float16_supported()))


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] weight -> the same weight in oneDNN's GEMM layout (an opaque tensor)."""
    if not can_pack(weight):
        raise ValueError(f"cannot pack a {weight.dtype} weight of shape {tuple(weight.shape)} on "
                         f"{weight.device} for oneDNN (available: {available()})")
    reorder, _ = _ops()
    return reorder(weight.detach().contiguous(), None)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + bias, with W packed by `pack`; x: [..., in] in W's dtype."""
    _, pointwise = _ops()
    return pointwise(x, packed, bias, "none", [], "")
