"""Model registry and weight loading (HF safetensors directories or hub ids)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

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
                device: torch.device, load_format: str) -> nn.Module:
    with torch.device(device):
        model = model_class(hf_config)(hf_config, max_position)
    model.to(dtype=dtype)
    if load_format == "dummy":
        _init_dummy(model)
    else:
        load_weights(model, model_dir)
    return model.eval().requires_grad_(False)


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Copy checkpoint tensors into the model, one tensor at a time (no full state dict)."""
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
                name, shard = _target(model, ckpt_name)
                if name not in params:
                    if name == "lm_head.weight":  # tied to the embedding: loaded through it
                        continue
                    raise ValueError(f"checkpoint tensor {ckpt_name!r} has no place in the model")
                _copy(params[name], f.get_tensor(ckpt_name), shard, model, name)
                loaded.add(name if shard is None else f"{name}#{shard}")
    expected = _expected_entries(model, params)
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint in {model_dir} lacks tensors for: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))


def _target(model: nn.Module, ckpt_name: str) -> tuple[str, int | None]:
    for fused, part, shard in model.stacked_params:
        if f".{part}." in ckpt_name:
            return ckpt_name.replace(f".{part}.", f".{fused}."), shard
    return ckpt_name, None


def _copy(param: torch.Tensor, tensor: torch.Tensor, shard: int | None, model: nn.Module,
          name: str) -> None:
    if shard is None:
        target = param.data
    else:
        fused = name.split(".")[-2]
        sizes = model.shard_sizes(fused)
        target = param.data.narrow(0, sum(sizes[:shard]), sizes[shard])
    if target.shape != tensor.shape:
        raise ValueError(f"checkpoint tensor for {name} has shape {tuple(tensor.shape)}, "
                         f"the model expects {tuple(target.shape)}")
    target.copy_(tensor)


def _expected_entries(model: nn.Module, params: dict[str, torch.Tensor]) -> set[str]:
    fused = {fused: len(model.shard_sizes(fused)) for fused, _, _ in model.stacked_params}
    expected = set()
    for name in params:
        part = name.split(".")[-2] if "." in name else ""
        if part in fused:
            expected.update(f"{name}#{i}" for i in range(fused[part]))
        else:
            expected.add(name)
    return expected


def _init_dummy(model: nn.Module) -> None:
    """Random weights for benchmarks: small normal values, norms at one."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=generator)
