"""A LoRA adapter's weights: PEFT's safetensors, checked against the base model's shapes.

PEFT saves each adapted projection of decoder layer i as two tensors,

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]

and the projection's output becomes `x W^T + scaling * (x A^T) B^T`. Any other
tensor (an embedding or LM-head adapter, a DoRA magnitude), a module the
config does not target, or a shape the base model does not have is refused
with a RequestError naming the tensor, and nothing is kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pagedserve.errors import RequestError
from pagedserve.lora_request import WEIGHTS_FILE, AdapterSpec
from pagedserve.model.shape import ModelShape, head_dim

_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)"
                  r"\.lora_([AB])\.weight")


@dataclass(frozen=True)
class LoRAWeights:
    """One adapter's A and B per (layer, projection), in the model's dtype."""

    spec: AdapterSpec
    pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def projection_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection of the (unsharded) base model."""
    hidden, size = config.hidden_size, head_dim(config)
    q, kv = config.num_attention_heads * size, config.num_key_value_heads * size
    inter = config.intermediate_size
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (q, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden)}


def load_lora_weights(spec: AdapterSpec, config, dtype: torch.dtype = torch.float32
                      ) -> LoRAWeights:
    """The adapter's weights for a base model of HF `config`; RequestError if they do not fit."""
    from safetensors.torch import load_file

    path = spec.path / WEIGHTS_FILE

    def refuse(reason: str) -> RequestError:
        return RequestError("lora_request", f"adapter {str(spec.path)!r}: {reason}")

    try:
        tensors = load_file(path)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own kinds
        raise refuse(f"{WEIGHTS_FILE} is not a readable safetensors file ({error})") from None
    shapes = projection_shapes(config)
    sparse = set(ModelShape.from_config(config).sparse_layers)
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise refuse(f"tensor {key!r} is not a LoRA weight of a decoder projection")
        layer, module, which = int(match[1]), match[2], match[3]
        if module == "experts":  # peft's adapter of a MoE layer's stacked expert weights
            raise refuse(f"tensor {key!r} adapts the experts of layer {layer}: adapters of a "
                         "mixture-of-experts model may adapt its attention "
                         f"({', '.join(ATTENTION_PROJECTIONS)}) and its dense layers' MLPs")
        if module not in spec.target_modules:
            raise refuse(f"tensor {key!r} adapts {module}, which target_modules does not name")
        if module not in shapes:
            raise refuse(f"tensor {key!r} adapts {module}; adapters may adapt "
                         f"{', '.join(shapes)}")
        if layer in sparse and module not in ATTENTION_PROJECTIONS:
            raise refuse(f"tensor {key!r} adapts the MLP of layer {layer}, which is a mixture "
                         "of experts: adapters of this model may adapt its attention "
                         f"({', '.join(ATTENTION_PROJECTIONS)}) and its dense layers' MLPs")
        if layer >= config.num_hidden_layers or (spec.layers is not None
                                                 and layer not in spec.layers):
            raise refuse(f"tensor {key!r} is for layer {layer}; the base model has "
                         f"{config.num_hidden_layers} and the config adapts "
                         f"{'all' if spec.layers is None else list(spec.layers)}")
        in_features, out_features = shapes[module]
        expected = (spec.rank, in_features) if which == "A" else (out_features, spec.rank)
        if tuple(tensor.shape) != expected:
            raise refuse(f"tensor {key!r} has shape {list(tensor.shape)}; this base model and "
                         f"rank {spec.rank} need {list(expected)}")
        found.setdefault((layer, module), {})[which] = tensor.to(dtype)
    if not found:
        raise refuse(f"{WEIGHTS_FILE} holds no LoRA weights")
    for (layer, module), pair in found.items():
        if len(pair) != 2:
            missing = "B" if "A" in pair else "A"
            raise refuse(f"layer {layer} {module} has no lora_{missing} weight")
    return LoRAWeights(spec, {key: (pair["A"], pair["B"]) for key, pair in sorted(found.items())})


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float
               ) -> torch.Tensor:
    """What an adapted projection adds to x's base output: scaling * (x A^T) B^T."""
    return (x @ a.t()) @ b.t() * scaling
