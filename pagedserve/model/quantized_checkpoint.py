"""A quantized HF checkpoint's linear layers read as they are stored.

Such a checkpoint holds each quantized layer as several tensors (packed integers,
scales, zero points: model/quant_scheme.py's table). `joined` passes the
checkpoint's tensors through, except that it gathers each quantized layer's parts
into one `<layer>.weight` slice, so the model's weight loaders see the names and
shapes of a float checkpoint. A slice gives its rows and columns as stored
(`quantized`: model/quantized_rows.py, what the kernels take), or as floats when
indexed (the weight dequantized, where it is not kept quantized). With
`model.quantization="fp8"` a float checkpoint's linear weights are quantized here,
at load, to float8_e4m3 with one scale per output channel (vLLM's online FP8).

Every format is turned into W = q * scale + offset:
- compressed-tensors stores signed values q_s with W = (q_s - z) * s; 4-bit ones
  are held as q_s + 8 (0..15) with offset -(8 + z) s. Its own `unpack_from_int32`
  reads the packing.
- AWQ stores unsigned 4-bit q and zero z: offset -z s. compressed-tensors'
  AutoAWQ converter reads AWQ's interleaved packing.
- GPTQ stores unsigned q packed along the input features, and zeros stored as
  z - 1 (checkpoint_format "gptq"; "gptq_v2" stores z). 8-bit values are held
  signed, q - 128, with the offset moved to match. An act-order checkpoint whose
  g_idx is not in order is refused: its groups are not runs of input features.
- FP8 stores float8_e4m3 values with one scale per channel, per tensor, or per
  [128, 128] block (`weight_scale_inv`, a multiplier despite its name).
Activation scales (`input_scale`) are read and kept for the GPU's FP8 GEMM; the
CPU kernel computes with float activations.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from pagedserve.model.quant_scheme import WeightScheme
from pagedserve.model.quantized_rows import QuantizedRows

FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
# The tensors that make up one quantized layer, by the suffix after `<layer>.`.
_PARTS = {
    "awq": ("qweight", "qzeros", "scales"),
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
}
# ... and, for the formats whose `weight` holds the values, their other parts.
_SCALE_PARTS = {"compressed-tensors": ("weight_scale", "weight_zero_point", "input_scale",
                                       "weight_g_idx", "weight_packed", "weight_shape"),
                "fp8": ("weight_scale_inv", "input_scale")}
_QUANTIZED_DTYPES = {"I8", "F8_E4M3", torch.int8, torch.float8_e4m3fn}
# Kept in the model dtype, as vLLM does: the vocabulary and a MoE layer's router.
_NOT_ONLINE = ("embed_tokens", "lm_head", "mlp.gate.")


def joined(tensors: Iterable[tuple[str, object]], scheme: WeightScheme
           ) -> Iterator[tuple[str, object]]:
    """The checkpoint's (name, tensor) pairs with each quantized layer's parts joined
    into one (`<layer>.weight`, slice) pair (see the module docstring)."""
    if scheme.method == "online-fp8":
        for name, tensor in tensors:
            if _online(name, tensor):
                yield name, QuantizedSlice(scheme, {"weight": tensor}, name)
            else:
                yield name, tensor
        return
    pending: dict[str, dict[str, object]] = {}
    done: dict[str, QuantizedSlice] = {}
    for name, tensor in tensors:
        layer, _, part = name.rpartition(".")
        if not _is_part(scheme, part, tensor):
            yield name, tensor
        elif layer in done:  # a .bin file's g_idx, saved after the parts it orders
            if part.endswith("g_idx"):
                _check_in_order(_read(tensor), done[layer].rows().group, layer)
        else:
            parts = pending.setdefault(layer, {})
            parts[part] = tensor
            if all(needed in parts for needed in _required(scheme)):
                done[layer] = QuantizedSlice(scheme, pending.pop(layer), layer)
                yield f"{layer}.weight", done[layer]
    for layer, parts in pending.items():  # a checkpoint that lacks a part
        missing = [needed for needed in _required(scheme) if needed not in parts]
        raise ValueError(f"checkpoint layer {layer!r} ({scheme.method} {scheme.name}) lacks "
                         f"{', '.join(missing)}")


def _online(name: str, tensor) -> bool:
    return (name.endswith(".weight") and len(_shape(tensor)) == 2
            and not any(part in name for part in _NOT_ONLINE))


def _is_part(scheme: WeightScheme, part: str, tensor) -> bool:
    if scheme.method in _PARTS:
        return part in _PARTS[scheme.method]
    if part == "weight":  # stored quantized (int8 or float8), else a float layer
        return _dtype(tensor) in _QUANTIZED_DTYPES
    return part in _SCALE_PARTS[scheme.method]


def _required(scheme: WeightScheme) -> list[str]:
    if scheme.method == "awq":
        return ["qweight", "scales"] + (["qzeros"] if not scheme.symmetric else [])
    if scheme.method == "gptq":
        return ["qweight", "qzeros", "scales"]
    if scheme.method == "fp8":
        return ["weight", "weight_scale_inv"]
    needed = ["weight_packed", "weight_shape"] if scheme.format == "pack-quantized" else ["weight"]
    needed.append("weight_scale")
    if not scheme.symmetric:
        needed.append("weight_zero_point")
    if scheme.activations == "static":
        needed.append("input_scale")
    return needed


class QuantizedSlice:
    """One quantized layer's weight [N, K], as its parts store it (module docstring)."""

    kept_quantized = True

    def __init__(self, scheme: WeightScheme, parts: dict[str, object], layer: str) -> None:
        self.scheme = scheme
        self.parts = parts
        self.layer = layer
        self._rows: QuantizedRows | None = None

    def get_shape(self) -> tuple[int, int]:
        parts, method = self.parts, self.scheme.method
        if method == "awq":
            k, packed = _shape(parts["qweight"])
            return packed * 8, k
        if method == "gptq":
            packed, n = _shape(parts["qweight"])
            return n, packed * 32 // self.scheme.bits
        if "weight_shape" in parts:
            return tuple(int(v) for v in _read(parts["weight_shape"]).tolist())  # type: ignore
        return _shape(parts["weight"])  # type: ignore[return-value]

    @property
    def input_scale(self) -> torch.Tensor | None:
        """The static activation scale of an FP8 checkpoint, if it has one."""
        scale = self.parts.get("input_scale")
        return None if scale is None else _read(scale).float()

    def rows(self) -> QuantizedRows:
        """The whole weight, decoded once."""
        if self._rows is None:
            try:
                self._rows = _DECODERS[self.scheme.method](self.scheme, {
                    name: _read(part) for name, part in self.parts.items()})
            except ValueError as error:
                raise ValueError(f"checkpoint layer {self.layer!r}: {error}") from None
        return self._rows

    def quantized(self, rows: slice, cols: slice) -> QuantizedRows:
        return self.rows().select(rows, cols)

    def __getitem__(self, key) -> torch.Tensor:
        return self.rows().dequantize()[key]


def _compressed_tensors(scheme: WeightScheme, parts: dict[str, torch.Tensor]) -> QuantizedRows:
    scale = parts["weight_scale"].float()
    if scheme.kind == "float":
        return _fp8(parts["weight"], scale)
    if "weight_g_idx" in parts:
        _check_in_order(parts["weight_g_idx"], scheme.group, "")
    bits = scheme.bits
    if scheme.format == "pack-quantized":
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        shape = torch.Size(parts["weight_shape"].tolist())
        q = unpack_from_int32(parts["weight_packed"], bits, shape)
    else:
        q = parts["weight"]
        shape = q.shape
    scale = scale.reshape(shape[0], -1)
    zero = torch.zeros_like(scale)
    if "weight_zero_point" in parts:
        stored = parts["weight_zero_point"]
        if scheme.format == "pack-quantized" and stored.dtype == torch.int32:
            from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

            stored = unpack_from_int32(stored, bits, scale.shape, packed_dim=0)
        zero = stored.reshape(scale.shape).float()
    group = shape[1] // scale.shape[1]
    if bits == 4:  # held unsigned: q_s + 8
        return QuantizedRows((q.to(torch.int16) + 8).to(torch.uint8), scale,
                             -(zero + 8) * scale, 4, group)
    return QuantizedRows(q.to(torch.int8), scale,
                         None if scheme.symmetric else -zero * scale, 8, group)


def _awq(scheme: WeightScheme, parts: dict[str, torch.Tensor]) -> QuantizedRows:
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    q, zeros = AutoAWQConverter.unpack_awq(parts["qweight"], parts.get("qzeros"), 4)
    q, zeros = AutoAWQConverter.reverse_awq_order(q, zeros, 4)
    scale = parts["scales"].float().T.contiguous()  # [N, K / G]
    q = (q & 0xF).to(torch.uint8).T.contiguous()
    zero = (zeros & 0xF).float().T if zeros is not None else torch.full_like(scale, 8.0)
    return QuantizedRows(q, scale, -zero * scale, 4, q.shape[1] // scale.shape[1])


def _gptq(scheme: WeightScheme, parts: dict[str, torch.Tensor]) -> QuantizedRows:
    bits, mask = scheme.bits, (1 << scheme.bits) - 1
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    packed = parts["qweight"]  # [K * bits / 32, N]: input features packed, low bits first
    q = ((packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask).reshape(-1, packed.shape[1])
    zeros = parts["qzeros"]  # [groups, N * bits / 32]: output features packed
    z = ((zeros.unsqueeze(2) >> shifts.view(1, 1, -1)) & mask).reshape(zeros.shape[0], -1)
    z = z[:, :packed.shape[1]].float()
    if scheme.format == "gptq":  # stored as z - 1
        z = z + 1
    scale = parts["scales"].float()
    group = q.shape[0] // scale.shape[0]
    if "g_idx" in parts:
        _check_in_order(parts["g_idx"], group, "")
    q, scale, z = q.T.contiguous(), scale.T.contiguous(), z.T.contiguous()
    if bits == 4:
        return QuantizedRows(q.to(torch.uint8), scale, -z * scale, 4, group)
    return QuantizedRows((q - 128).to(torch.int8), scale, -(z - 128) * scale, 8, group)


def _block_fp8(scheme: WeightScheme, parts: dict[str, torch.Tensor]) -> QuantizedRows:
    weight = parts["weight"]
    n, k = weight.shape
    block_rows, block_cols = scheme.block or (128, 128)
    if k % block_cols:
        raise ValueError(f"in_features={k} is not a multiple of the scale blocks' "
                         f"{block_cols} columns")
    scale = parts["weight_scale_inv"].float().repeat_interleave(block_rows, dim=0)[:n]
    return QuantizedRows(weight, scale.contiguous(), None, 8, block_cols)


def _online_fp8(scheme: WeightScheme, parts: dict[str, torch.Tensor]) -> QuantizedRows:
    weight = parts["weight"].float()
    scale = (weight.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    q = (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return QuantizedRows(q, scale, None, 8, weight.shape[1])


def _fp8(weight: torch.Tensor, scale: torch.Tensor) -> QuantizedRows:
    n, k = weight.shape
    scale = scale.reshape(-1, 1).expand(n, 1) if scale.numel() == 1 else scale.reshape(n, 1)
    return QuantizedRows(weight.view(torch.float8_e4m3fn), scale.contiguous(), None, 8, k)


def _check_in_order(g_idx: torch.Tensor, group: int | None, layer: str) -> None:
    """An act-order g_idx that is not simply k // group: its groups are scattered."""
    if group is None:
        return
    expected = torch.arange(g_idx.numel(), dtype=torch.int64) // group
    if not torch.equal(g_idx.long(), expected):
        where = f"checkpoint layer {layer!r}: " if layer else ""
        raise ValueError(f"{where}its g_idx is in activation order (desc_act / actorder), so "
                         "its groups are not runs of input features, which no kernel of ours "
                         "runs: use a checkpoint quantized without act-order")


_DECODERS = {"compressed-tensors": _compressed_tensors, "awq": _awq, "gptq": _gptq,
             "fp8": _block_fp8, "online-fp8": _online_fp8}


def _read(tensor) -> torch.Tensor:
    return tensor if isinstance(tensor, torch.Tensor) else tensor[:]


def _shape(tensor) -> tuple[int, ...]:
    return tuple(tensor.get_shape()) if hasattr(tensor, "get_shape") else tuple(tensor.shape)


def _dtype(tensor):
    return tensor.get_dtype() if hasattr(tensor, "get_dtype") else tensor.dtype
