"""Weights kept quantized in memory: a linear layer's (or the embedding's) weight as
4-bit or 8-bit integers, or float8, with a scale and an offset per group, never
copied out as floats. On the CPU, kernels/cpu_kernels.py's `quant_linear`
computes on them (`QuantizedWeight`); on CUDA, kernels/quant_gemm.py's Triton
GEMM, or torch._scaled_mm for an FP8 weight with one scale a channel on sm_89
and newer (`DeviceQuantizedWeight`). A weight whose groups the Triton kernel
cannot tile (a group that is not a multiple of 16) is dequantized, with a log
line.

Loading. A model built under `quantized_loading()` creates its linear and
embedding weights on the meta device: no memory. Each weight loader then hands
its rank's rows and columns of a checkpoint tensor to `collect`, which keeps them
as they are stored (model/quantized_rows.py) where the checkpoint slice can give
them so (a GGUF tensor of a kept type), else as floats. After the last tensor,
`finalize` turns every collected weight into a `QuantizedWeight` attached to the
parameter (`param.quantized`), or, where any part of a fused weight came as
floats, into an ordinary float parameter (a log line says which). Tied weights
share one parameter, so the LM head gets the embedding's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import nn

from pagedserve.kernels import cpu_kernels
from pagedserve.model.quantized_rows import QuantizedRows

logger = logging.getLogger(__name__)

_LOADING = ContextVar("quantized_loading", default=False)


@contextlib.contextmanager
def quantized_loading() -> Iterator[None]:
    """Models built inside create their weights for quantized loading (see above)."""
    token = _LOADING.set(True)
    try:
        yield
    finally:
        _LOADING.reset(token)


def new_weight(*shape: int) -> nn.Parameter:
    """A layer's weight (or a MoE layer's stacked experts): on the meta device, collecting
    its parts, when loading quantized."""
    if not _LOADING.get():
        return nn.Parameter(torch.empty(*shape), requires_grad=False)
    param = nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)
    param.quant_parts = {}
    return param


def uses_triton(device: torch.device) -> bool:
    """Whether weights on `device` are packed for the Triton GEMM (the tests set it for
    CPU tensors, which Triton's interpreter runs)."""
    return device.type != "cpu"


def packed_for(rows: QuantizedRows, device: torch.device, scaled_mm: bool = True
               ) -> QuantizedWeight | DeviceQuantizedWeight:
    """`rows` packed for the kernel that runs on `device` (see DeviceQuantizedWeight for
    `scaled_mm`). ValueError where that kernel cannot take its groups."""
    if uses_triton(device):
        return DeviceQuantizedWeight(rows, device, scaled_mm)
    return QuantizedWeight(rows)


class QuantizedWeight:
    """A [out_features, in_features] weight packed for the CPU kernel."""

    def __init__(self, rows: QuantizedRows) -> None:
        self.out_features, self.in_features = rows.shape
        self.fmt, self.group = rows.fmt, rows.group
        self.qweight, self.scales, self.offsets = cpu_kernels.pack_quantized(
            rows.q, rows.scales, rows.offsets, rows.fmt)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.qweight, self.scales, self.offsets) if t is not None)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.dtype == torch.float32:  # decode runs an op per layer: no no-op casts
            out = cpu_kernels.quant_linear(x, self.qweight, self.scales, self.offsets, self.fmt,
                                           self.out_features)
        else:
            out = cpu_kernels.quant_linear(x.float(), self.qweight, self.scales, self.offsets,
                                           self.fmt, self.out_features).to(x.dtype)
        return out if bias is None else out + bias

    def dense(self) -> torch.Tensor:
        """The float32 weight it stands for."""
        return cpu_kernels.unpack_quantized(self.qweight, self.scales, self.offsets, self.fmt,
                                            self.out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight as float32 (an embedding lookup): [len(ids), K]."""
        block, lane = ids // 32, ids % 32
        if self.fmt == "int4":
            packed = self.qweight[block, :, lane % 16]  # [n, K] bytes
            q = torch.where((lane < 16).unsqueeze(1), packed & 0xF, packed >> 4).float()
        elif self.fmt == "fp8_e4m3":
            q = self.qweight[block, :, lane].view(torch.float8_e4m3fn).float()
        else:
            q = self.qweight[block, :, lane].float()
        values = q * self.scales[block, :, lane].float().repeat_interleave(self.group, dim=1)
        if self.offsets is not None:
            values += self.offsets[block, :, lane].float().repeat_interleave(self.group, dim=1)
        return values


class DeviceQuantizedWeight:
    """A [out_features, in_features] weight for the GPU: packed for kernels/quant_gemm.py,
    or, for an FP8 weight with one scale a channel where torch._scaled_mm runs float8
    (quant_gemm.fp8_supported), kept as the checkpoint's float8 matrix and multiplied
    with activations quantized per token (W8A8, vLLM's dynamic scheme; a static
    input scale in the checkpoint is not used). `scaled_mm=False` packs every format
    for the Triton kernel (MoE experts, which fused_moe reads stacked)."""

    def __init__(self, rows: QuantizedRows, device: torch.device, scaled_mm: bool = True
                 ) -> None:
        from pagedserve.kernels import quant_gemm  # Triton

        self.out_features, self.in_features = rows.shape
        self.fmt, self.group = rows.fmt, rows.group
        self.fp8: tuple[torch.Tensor, torch.Tensor] | None = None
        self.gemm = None
        per_channel = rows.group == self.in_features and rows.offsets is None
        if (scaled_mm and rows.fmt == "fp8_e4m3" and per_channel
                and quant_gemm.fp8_supported(device)
                and self.in_features % 16 == 0 and self.out_features % 16 == 0):
            self.fp8 = (rows.q.to(device).contiguous(),
                        rows.scales.float().reshape(-1).to(device).contiguous())
        else:
            self.gemm = quant_gemm.pack(rows.q.to(device), rows.scales.to(device),
                                        None if rows.offsets is None
                                        else rows.offsets.to(device), rows.fmt, rows.group)

    @property
    def device(self) -> torch.device:
        return (self.fp8[0] if self.gemm is None else self.gemm.codes).device

    @property
    def nbytes(self) -> int:
        tensors = self.fp8 if self.gemm is None else (
            self.gemm.codes, self.gemm.scales, self.gemm.offsets)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from pagedserve.kernels import quant_gemm

        flat = x.reshape(-1, self.in_features)
        if flat.stride(-1) != 1:  # the kernel reads rows of contiguous features
            flat = flat.contiguous()
        if self.gemm is None:
            out = quant_gemm.fp8_scaled_mm(flat, *self.fp8)
        else:
            out = quant_gemm.quant_matmul(flat, self.gemm)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if bias is None else out + bias

    def dense(self) -> torch.Tensor:
        """The float32 weight it stands for."""
        return self.rows(None)

    def rows(self, ids: torch.Tensor | None) -> torch.Tensor:
        """Rows `ids` of the weight as float32 (an embedding lookup; None: all of them)."""
        from pagedserve.kernels import quant_gemm

        if self.gemm is not None:
            return quant_gemm.unpack(self.gemm, ids)
        weight, scale = self.fp8
        if ids is not None:
            weight, scale = weight[ids], scale[ids]
        return weight.float() * scale.unsqueeze(1)


class QuantizedExperts(list):
    """A MoE layer's experts (w13 or w2), one QuantizedWeight each; on the GPU also
    `stacked`, all of them as one quant_gemm weight for fused_moe, of which each
    expert's weight is a view."""

    stacked = None

    def stack(self) -> None:
        """Set `stacked` where the experts are packed for Triton alike."""
        from pagedserve.kernels import quant_gemm

        if not all(isinstance(w, DeviceQuantizedWeight) and w.gemm is not None for w in self):
            return
        try:
            stacked = quant_gemm.stack([w.gemm for w in self])
        except ValueError as error:
            logger.info("experts run one by one, not fused: %s", error)
            return
        for index, weight in enumerate(self):
            weight.gemm = quant_gemm.expert(stacked, index)
        self.stacked = stacked

    @property
    def nbytes(self) -> int:
        return sum(weight.nbytes for weight in self)


def collect(param: torch.Tensor, index, loaded, rows: slice, cols: slice) -> None:
    """Part `index` of a meta weight: the checkpoint's `rows` and `cols`, quantized if
    the checkpoint slice keeps them so."""
    if getattr(loaded, "kept_quantized", False):
        param.quant_parts[index] = loaded.quantized(rows, cols)
    else:
        param.quant_parts[index] = loaded[rows, cols]


def finalize(model: nn.Module, dtype: torch.dtype, device: torch.device) -> int:
    """Every collected weight made whole (see the module docstring); returns how many
    stayed quantized."""
    kept = 0
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if hasattr(module, "finalize_quantized"):  # a MoE layer: experts made whole each
            kept += module.finalize_quantized(dtype, device)
            continue
        for name, param in list(module._parameters.items()):
            if param is None or not hasattr(param, "quant_parts"):
                continue
            if id(param) not in replaced:
                replaced[id(param)], stayed = _made_whole(param, dtype, device)
                kept += stayed
            setattr(module, name, replaced[id(param)])
    return kept


def _made_whole(param: nn.Parameter, dtype: torch.dtype, device: torch.device
                ) -> tuple[nn.Parameter, bool]:
    parts = [param.quant_parts[index] for index in sorted(param.quant_parts)]
    missing = param.shape[0] - sum(part.shape[0] for part in parts)
    if missing:  # a vocabulary padded for tensor parallelism: zero rows, never looked up
        parts.append(_zero_rows(parts[-1], missing, param.shape[1]))
    if all(isinstance(part, QuantizedRows) for part in parts):
        rows = QuantizedRows.cat(parts)
        try:
            param.quantized = packed_for(rows, device)
        except ValueError as error:
            logger.info("a weight of shape %s: %s; dequantized into %s", tuple(param.shape),
                        error, dtype)
        else:
            del param.quant_parts
            return param, True
    elif any(isinstance(part, QuantizedRows) for part in parts):
        logger.info("a weight of shape %s mixes kept-quantized and other tensor types: "
                    "dequantized into %s", tuple(param.shape), dtype)
    weight = torch.cat([part.dequantize() if isinstance(part, QuantizedRows) else part.float()
                        for part in parts])
    return nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False), False


def experts_made_whole(parts: list[list], dtype: torch.dtype, device: torch.device
                       ) -> QuantizedExperts | torch.Tensor:
    """Each expert's collected parts (gate and up, or down) joined: QuantizedExperts where
    every part of every expert came quantized and joins, else the stacked float weights."""
    try:
        if all(isinstance(part, QuantizedRows) for expert in parts for part in expert):
            experts = QuantizedExperts(packed_for(QuantizedRows.cat(expert), device,
                                                  scaled_mm=False) for expert in parts)
            experts.stack()
            return experts
    except ValueError as error:  # float8 and integer parts in one expert, or groups no kernel takes
        logger.info("experts not kept quantized (%s): dequantized into %s", error, dtype)
    return torch.stack([torch.cat([part.dequantize() if isinstance(part, QuantizedRows)
                                   else part.float() for part in expert]) for expert in parts]
                       ).to(device=device, dtype=dtype)


def _zero_rows(like, count: int, cols: int):
    if not isinstance(like, QuantizedRows):
        return torch.zeros(count, cols)
    groups = cols // like.group
    return QuantizedRows(torch.zeros(count, cols, dtype=like.q.dtype), torch.zeros(count, groups),
                         None if like.offsets is None else torch.zeros(count, groups),
                         like.bits, like.group)


def quantized_of(param: torch.Tensor) -> QuantizedWeight | DeviceQuantizedWeight | None:
    return getattr(param, "quantized", None)
