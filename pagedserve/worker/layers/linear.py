"""Tensor-parallel linear layers (Megatron-style) and how each loads its shard.

A transformer block needs one all-reduce per sublayer:

    column-parallel (qkv, gate_up):  W split by output rows, y_r = x W_r^T, no communication
    row-parallel    (o, down):       W split by input columns, y = sum_r x_r W_r^T (all-reduce)

so the activations between the two stay split by heads (attention) or by
intermediate features (MLP). Each parameter carries a `weight_loader(param,
loaded, shard_id)` that copies only this rank's slice of a checkpoint tensor;
`loaded` is a safetensors slice (nothing is read until it is indexed) or a
tensor.

On the CPU, `pack_linear_weights` packs every linear weight once after loading
(kernels/cpu_gemm.py), and `apply_linear` runs on the packed weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.kernels import cpu_gemm
from pagedserve.worker.distributed import TPGroup
from pagedserve.worker.layers.quantized import collect, new_weight, quantized_of


def checkpoint_shape(loaded) -> tuple[int, ...]:
    """Shape of a safetensors slice or a tensor, without reading it."""
    return tuple(loaded.get_shape()) if hasattr(loaded, "get_shape") else tuple(loaded.shape)


def default_weight_loader(param: torch.Tensor, loaded, shard_id: int | None = None) -> None:
    """A replicated parameter: every rank copies the whole tensor."""
    check_shape(checkpoint_shape(loaded), tuple(param.shape))
    if hasattr(param, "quant_parts"):
        collect(param, 0, loaded, slice(None), slice(None))
    else:
        param.data.copy_(loaded[:])


def check_shape(got: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if got != expected:
        raise ValueError(f"has shape {got}, the model expects {expected}")


def apply_linear(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ layer.weight^T + bias, on the quantized or packed weight when the layer has one."""
    quantized = quantized_of(layer.weight)
    if quantized is not None:
        return quantized.linear(x, bias)
    if layer.packed_weight is None:
        return F.linear(x, layer.weight, bias)
    return cpu_gemm.linear(x, layer.packed_weight, bias)


def cpu_float16_supported() -> bool:
    """Whether this CPU runs float16 linear layers natively (oneDNN's float16 GEMM,
    on avx512_fp16 or avx_ne_convert). Without, float16 is slow and unpacked."""
    return cpu_gemm.float16_supported()


def pack_linear_weights(model: nn.Module) -> int:
    """Pack the weight of every layer that takes one (`packed_weight`) for oneDNN; returns
    how many were packed, 0 where oneDNN is missing.

    Called once, after loading (and after TP sharding: each rank packs its own
    slice). The plain weight is then dropped: `weight` becomes a meta tensor of
    its shape, so that reading it fails instead of computing with stale values.
    A weight another module shares is kept: a tied LM head keeps the embedding's
    table, which lookups need. The packed weight has the shape, dtype and device
    of the plain one (LoRA stacks are sized by it), and `dense_parameters` reads
    the values back.
    """
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                owners[id(param)] = owners.get(id(param), 0) + 1
    packed = 0
    for module in model.modules():
        if hasattr(module, "pack_for_cpu"):  # a MoE layer's experts (layers/moe.py)
            packed += module.pack_for_cpu()
            continue
        if not hasattr(module, "packed_weight") or not cpu_gemm.can_pack(module.weight):
            continue
        module.packed_weight = cpu_gemm.pack(module.weight)
        if owners[id(module.weight)] == 1:
            module.weight = nn.Parameter(module.weight.to("meta"), requires_grad=False)
        packed += 1
    return packed


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights hold in memory: parameters, weights packed for oneDNN
    or the MoE kernel (in place of their meta parameters), quantized weights. A weight
    two modules share counts once."""
    total, seen = 0, set()
    for module in model.modules():
        for param in module._parameters.values():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            quantized = quantized_of(param)
            if quantized is not None:
                total += quantized.nbytes
            elif not param.is_meta:
                total += param.numel() * param.element_size()
        packed = getattr(module, "packed_weight", None)
        if packed is not None:  # same shape and dtype as the plain weight it replaces
            total += packed.numel() * packed.element_size()
        for tensors in (getattr(module, "blocked", None), getattr(module, "packed", None)):
            for tensor in _flat(tensors):
                total += tensor.numel() * tensor.element_size()
    return total


def _flat(tensors) -> list[torch.Tensor]:
    if tensors is None:
        return []
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    return [t for item in tensors for t in _flat(item)]


def base_weight(layer: nn.Module) -> torch.Tensor:
    """A tensor with the shape, dtype and device of a layer's weight: packed, plain, or
    (for a weight kept quantized, whose parameter is a meta tensor) a stand-in that
    holds no memory."""
    quantized = quantized_of(layer.weight)
    if quantized is not None:
        return torch.empty((), dtype=layer.weight.dtype,
                           device=quantized.device).expand(layer.weight.shape)
    return layer.weight if layer.packed_weight is None else layer.packed_weight


def dense_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """`named_parameters`, with packed weights read back as plain tensors."""
    params = dict(model.named_parameters())
    for name, param in params.items():
        quantized = quantized_of(param)
        if quantized is not None:
            params[name] = quantized.dense()
    for name, module in model.named_modules():
        if getattr(module, "packed_weight", None) is not None:
            params[f"{name}.weight"] = module.packed_weight.to_dense()
        if hasattr(module, "dense_weights"):
            params.update({f"{name}.{key}": value
                           for key, value in module.dense_weights().items()})
    return params


def _new_parameter(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class ReplicatedLinear(nn.Module):
    """The whole weight on every rank (a MoE router's): no split, no communication."""

    def __init__(self, input_size: int, output_size: int, bias: bool) -> None:
        super().__init__()
        self.weight = new_weight(output_size, input_size)
        self.bias = _new_parameter(output_size) if bias else None
        self.packed_weight = None  # set by pack_linear_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(self, x, self.bias)


class ColumnParallelLinear(nn.Module):
    """Output features split over ranks; no communication.

    `output_sizes` lists the full sizes of the parts fused into this one matmul
    (q/k/v, or gate/up) in checkpoint order. Each part is split on its own, so
    rank r holds rows [r n_i/tp, (r+1) n_i/tp) of every part i, side by side.
    """

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool, tp: TPGroup,
                 what: str = "output features") -> None:
        super().__init__()
        self.tp = tp
        self.full_sizes = list(output_sizes)
        self.part_sizes = [tp.split(size, what) for size in output_sizes]
        self.weight = new_weight(sum(self.part_sizes), input_size)
        self.bias = _new_parameter(sum(self.part_sizes)) if bias else None
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self.load_part
                param.num_parts = len(self.full_sizes)
        self.lora = None  # a LoRAStack (layers/lora.py) when the engine serves adapters
        self.packed_weight = None  # set by pack_linear_weights

    def load_part(self, param: torch.Tensor, loaded, shard_id: int | None) -> None:
        index = shard_id or 0
        full, part = self.full_sizes[index], self.part_sizes[index]
        check_shape(checkpoint_shape(loaded), (full, *param.shape[1:]))
        start = self.tp.rank * part
        if hasattr(param, "quant_parts"):
            collect(param, index, loaded, slice(start, start + part), slice(None))
            return
        param.data.narrow(0, sum(self.part_sizes[:index]), part).copy_(loaded[start:start + part])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = apply_linear(self, x, self.bias)
        if self.lora is not None:
            self.lora.add_to(x, out)
        return out


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection split by heads: each rank computes its own query and KV heads."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool, tp: TPGroup) -> None:
        self.num_heads = tp.split(num_heads, "num_attention_heads")
        self.num_kv_heads = tp.split(num_kv_heads, "num_key_value_heads")
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        kv_size = num_kv_heads * head_dim
        super().__init__(hidden_size, [num_heads * head_dim, kv_size, kv_size], bias, tp)


class RowParallelLinear(nn.Module):
    """Input features split over ranks; partial products are summed by one all-reduce.

    The bias is added on rank 0 only, before the sum, so it is counted once.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool, tp: TPGroup,
                 what: str = "input features") -> None:
        super().__init__()
        self.tp = tp
        self.part_size = tp.split(input_size, what)
        self.weight = new_weight(output_size, self.part_size)
        self.weight.weight_loader = self.load_weight
        self.bias = _new_parameter(output_size) if bias else None
        self.lora = None  # a LoRAStack (layers/lora.py) when the engine serves adapters
        self.packed_weight = None  # set by pack_linear_weights

    def load_weight(self, param: torch.Tensor, loaded, shard_id: int | None) -> None:
        check_shape(checkpoint_shape(loaded), (param.shape[0], self.part_size * self.tp.size))
        start = self.tp.rank * self.part_size
        if hasattr(param, "quant_parts"):
            try:
                collect(param, 0, loaded, slice(None), slice(start, start + self.part_size))
            except ValueError as error:  # a split inside a quantization block
                raise ValueError(f"is split over tensor_parallel_size={self.tp.size} into "
                                 f"{self.part_size} input features a rank, which {error}: use a "
                                 "tensor_parallel_size that splits on its blocks") from None
            return
        param.data.copy_(loaded[:, start:start + self.part_size])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = apply_linear(self, x, self.bias if self.tp.rank == 0 else None)
        if self.lora is not None:  # this rank's partial delta joins the one all-reduce
            self.lora.add_to(x, out)
        return self.tp.all_reduce(out)
