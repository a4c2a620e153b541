"""Model registry and weight loading (HF safetensors directories or hub ids)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pagedserve.worker.distributed import TPGroup
from pagedserve.worker.layers import default_dtype
from pagedserve.worker.layers.linear import default_weight_loader
from pagedserve.worker.models.llama import LlamaForCausalLM

_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def model_class(hf_config) -> type[nn.Module]:
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    raise ValueError(f"model architectures={hf_config.architectures!r} are not supported "
                     f"(supported: {', '.join(sorted(_ARCHITECTURES))})")


def build_model(hf_config, model_dir: Path, *, max_position: int, dtype: torch.dtype,
                device: torch.device, load_format: str, tp: TPGroup = TPGroup()) -> nn.Module:
    """This rank's shard of the model, with its weights (or random ones for "dummy").

    Parameters are created on `device` in `dtype` and left uninitialised until
    they are loaded or drawn; buffers built in float32 (the rotary table) are
    cast after.
    """
    with torch.device(device), default_dtype(dtype):
        model = model_class(hf_config)(hf_config, max_position, tp)
    model.to(dtype=dtype)
    if load_format == "dummy":
        _init_dummy(model)
    else:
        load_weights(model, model_dir)
    return model.eval().requires_grad_(False)


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Copy this rank's slice of every checkpoint tensor into the model.

    Tensors are opened as safetensors slices: each parameter's `weight_loader`
    indexes only the rows or columns its rank holds, so no rank reads (or
    holds) the whole model.
    """
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for file in files:
        with safe_open(file, framework="pt") as f:
            for ckpt_name in f.keys():
                if "rotary_emb" in ckpt_name:
                    continue
                name, shard_id = _target(model, ckpt_name)
                if name not in params:
                    if name == "lm_head.weight":  # tied to the embedding: loaded through it
                        continue
                    raise ValueError(f"checkpoint tensor {ckpt_name!r} has no place in the model")
                param = params[name]
                loader = getattr(param, "weight_loader", default_weight_loader)
                try:
                    loader(param, f.get_slice(ckpt_name), shard_id)
                except ValueError as error:
                    raise ValueError(f"checkpoint tensor {ckpt_name!r} {error}") from None
                loaded.add(name if shard_id is None else f"{name}#{shard_id}")
    missing = sorted(_expected_entries(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint in {model_dir} lacks tensors for: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))


def _target(model: nn.Module, ckpt_name: str) -> tuple[str, int | None]:
    for fused, part, shard_id in model.stacked_params:
        if f".{part}." in ckpt_name:
            return ckpt_name.replace(f".{part}.", f".{fused}."), shard_id
    return ckpt_name, None


def _expected_entries(params: dict[str, torch.Tensor]) -> set[str]:
    """Every parameter, and each part of a fused one, must come from the checkpoint."""
    expected = set()
    for name, param in params.items():
        parts = getattr(param, "num_parts", 1)
        expected.update([name] if parts == 1 else (f"{name}#{i}" for i in range(parts)))
    return expected


def _init_dummy(model: nn.Module) -> None:
    """Random weights for benchmarks: small normal values, norms at one; drawn on the
    model's device in its dtype."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=generator)
