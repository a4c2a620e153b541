"""Quantized HF checkpoints written from a float one, as their own tools write them, for
tests: compressed-tensors (its own compressors pack the weights and write the
config), AWQ and GPTQ (packed here as AutoAWQ's and AutoGPTQ's writers pack them),
and FP8 with block scales (as Qwen's *-FP8 checkpoints store them).

`write_quantized` returns the directory and, for every quantized layer, the float
weight its stored form stands for: the oracle a test loads into transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMATS = ("w4a16", "w4a16-asym", "w8a16", "fp8-dynamic", "fp8-static", "awq", "gptq",
           "fp8-block")
_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_quantized(source: Path, out: Path, fmt: str, group: int = 128
                    ) -> tuple[Path, dict[str, torch.Tensor]]:
    """The float checkpoint at `source` quantized to `fmt` (FORMATS) in `out`, and the
    float weights (by name) that the quantized layers stand for."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}: one of {', '.join(FORMATS)}")
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    state = {name: tensor for file in sorted(source.glob("*.safetensors"))
             for name, tensor in load_file(file).items()}
    stored, oracle, config = {}, {}, None
    for name, tensor in state.items():
        layer, _, part = name.rpartition(".")
        if part != "weight" or layer.rpartition(".")[2] not in _LINEAR:
            stored[name] = tensor
            continue
        parts, oracle[name], config = _writer(fmt)(tensor, fmt, group)
        stored.update({f"{layer}.{key}": value.contiguous() for key, value in parts.items()})
    save_file(stored, out / "model.safetensors")
    hf_config = json.loads((source / "config.json").read_text())
    hf_config["quantization_config"] = config
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    return out, oracle


def write_oracle(source: Path, weights: dict[str, torch.Tensor], out: Path) -> Path:
    """The float checkpoint at `source` with `weights` (write_quantized's oracle) in place
    of its own, for transformers to load as it loads any checkpoint (it fuses a MoE
    layer's per-expert tensors on the way in)."""
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    state = {name: tensor for file in sorted(source.glob("*.safetensors"))
             for name, tensor in load_file(file).items()}
    save_file(state | {name: weight.to(state[name].dtype) for name, weight in weights.items()},
              out / "model.safetensors")
    return out


def _compressed_tensors(weight: torch.Tensor, fmt: str, group: int):
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    if fmt.startswith("fp8"):
        args = QuantizationArgs(num_bits=8, type="float", symmetric=True,
                                strategy="channel" if fmt == "fp8-dynamic" else "tensor")
        activations = QuantizationArgs(num_bits=8, type="float", symmetric=True,
                                       strategy="token" if fmt == "fp8-dynamic" else "tensor",
                                       dynamic=fmt == "fp8-dynamic")
        compression = "float-quantized"
    else:
        args = QuantizationArgs(num_bits=4 if fmt.startswith("w4") else 8, type="int",
                                symmetric=not fmt.endswith("asym"), strategy="group",
                                group_size=group)
        activations, compression = None, "pack-quantized"
    scheme = QuantizationScheme(targets=["Linear"], weights=args,
                                input_activations=activations, format=compression)
    n, k = weight.shape
    grouped = weight.float().reshape(n, -1, group if args.strategy == "group" else k)
    if args.strategy == "tensor":
        grouped = weight.float().reshape(1, 1, -1)
    scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    state = {"weight": weight, "weight_scale": scale.to(weight.dtype),
             "weight_zero_point": zero}
    if fmt == "fp8-static":
        state["input_scale"] = torch.tensor([0.02], dtype=weight.dtype)
    compressor = BaseCompressor.load_from_registry(compression)
    stored = compressor.compress(state, scheme)
    oracle = compressor.decompress(dict(stored), scheme)["weight"].float()
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=compression,
                                ignore=["lm_head"], quantization_status="compressed")
    return (stored, oracle,
            config.model_dump(mode="json") | {"quant_method": "compressed-tensors"})


def _integers(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, ...]:
    """Asymmetric 4-bit groups: q [N, K] 0..15, scales and zeros [N, K / G]."""
    n, k = weight.shape
    grouped = weight.float().reshape(n, k // group, group)
    low, high = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
    scale = ((high - low) / 15).clamp(min=1e-8).half().float()
    zero = (-low / scale).round().clamp(1, 15)  # GPTQ's stored z - 1 must not wrap
    q = (grouped / scale.unsqueeze(-1) + zero.unsqueeze(-1)).round().clamp(0, 15)
    oracle = ((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(n, k)
    return q.reshape(n, k).to(torch.int32), scale, zero.to(torch.int32), oracle


def _pack(values: torch.Tensor, order=range(8)) -> torch.Tensor:
    """[R, C] 4-bit values -> [R, C / 8] int32: nibble i of word j holds column 8 j + order[i]."""
    words = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for i, column in enumerate(order):
        words |= (values[:, column::8].long() & 0xF) << (4 * i)
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32)


def _awq(weight: torch.Tensor, fmt: str, group: int):
    q, scale, zero, oracle = _integers(weight, group)
    order = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's gemm packing
    parts = {"qweight": _pack(q.T, order), "qzeros": _pack(zero.T, order),
             "scales": scale.T.half()}
    return parts, oracle, {"quant_method": "awq", "bits": 4, "group_size": group,
                           "zero_point": True, "version": "gemm"}


def _gptq(weight: torch.Tensor, fmt: str, group: int):
    q, scale, zero, oracle = _integers(weight, group)
    k = q.shape[1]
    # qweight packs input features, [K / 8, N]; qzeros output features, stored minus one.
    parts = {"qweight": _pack(q).T.contiguous(), "qzeros": _pack((zero - 1).T.contiguous()),
             "scales": scale.T.half(), "g_idx": torch.arange(k, dtype=torch.int32) // group}
    return parts, oracle, {"quant_method": "gptq", "bits": 4, "group_size": group,
                           "desc_act": False, "sym": False, "checkpoint_format": "gptq"}


def _fp8(weight: torch.Tensor, fmt: str, group: int):
    n, k = weight.shape
    padded = torch.zeros(-(-n // 128) * 128, k)  # the last row block may be partial
    padded[:n] = weight.float()
    blocks = padded.reshape(-1, 128, k // 128, 128)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-8) / 448  # [N / 128, K / 128]
    full = scale.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)
    q = (weight.float() / full).clamp(-448, 448).to(torch.float8_e4m3fn)
    return ({"weight": q, "weight_scale_inv": scale}, q.float() * full,
            {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
             "weight_block_size": [128, 128]})


_WRITERS = {"awq": _awq, "gptq": _gptq, "fp8-block": _fp8}


def _writer(fmt: str):
    return _WRITERS.get(fmt, _compressed_tensors)
