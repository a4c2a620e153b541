"""RMSNorm, computed in float32 as Llama's reference implementation does.

Called with the residual stream, it adds the sublayer's output into it first
and normalizes the sum: `norm(x, residual) -> (normed, residual + x)`. On the
CPU in float32 that is one pass of the C++ kernel (kernels/cpu_kernels.py),
which adds in place; elsewhere, torch ops computing the same.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedserve.kernels import cpu_kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if (x.device.type == "cpu" and x.dtype == torch.float32 == self.weight.dtype
                and x.dim() == 2 and x.is_contiguous() and cpu_kernels.usable()):
            normed = cpu_kernels.rms_norm(x, self.weight, self.eps, residual)
            return normed if residual is None else (normed, residual)
        if residual is None:
            return self._norm(x)
        residual = residual + x
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
