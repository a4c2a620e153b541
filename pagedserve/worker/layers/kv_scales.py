"""A checkpoint's fp8 KV cache scales, set on each layer's Attention.

An fp8 KV cache stores x / scale (kernels/kv_quant.py). A checkpoint calibrated
for one carries a scale for K and one for V in each layer, under vLLM's names
or compressed-tensors':

    model.layers.{i}.self_attn.k_scale, .v_scale                 vLLM, ModelOpt
    model.layers.{i}.self_attn.k_proj.output_scale, .v_proj...   compressed-tensors
    model.layers.{i}.self_attn.kv_scale                          older vLLM: both

A layer without them keeps 1.0, as in vLLM; a float cache ignores them. They
are not weights: the weight loader (worker/models/__init__.py's load_weights)
offers each checkpoint tensor to `load_kv_scale` before it looks the name up
among the model's parameters, and skips those it takes.
"""

from __future__ import annotations

import math

from torch import nn

from pagedserve.worker.layers.attention import Attention
from pagedserve.worker.layers.linear import checkpoint_shape

# A scale's name after its layer's prefix -> the Attention attributes it sets.
_SCALES = {
    "self_attn.k_scale": ("k_scale",),
    "self_attn.v_scale": ("v_scale",),
    "self_attn.k_proj.output_scale": ("k_scale",),
    "self_attn.v_proj.output_scale": ("v_scale",),
    "self_attn.kv_scale": ("k_scale", "v_scale"),
}


def load_kv_scale(model: nn.Module, name: str, tensor) -> bool:
    """Set the scale checkpoint tensor `name` holds on its layer's Attention and return
    True; False when `name` is not a KV cache scale. `tensor`: a tensor or a safetensors
    slice of one number."""
    suffix = next((s for s in _SCALES if name.endswith(f".{s}")), None)
    if suffix is None:
        return False
    path = name[:-len(suffix)] + "self_attn.attn"
    try:
        attention = model.get_submodule(path)
    except AttributeError:
        attention = None
    if not isinstance(attention, Attention):
        raise ValueError(f"checkpoint tensor {name!r} is a KV cache scale, but the model has "
                         f"no attention layer {path!r}")
    shape = checkpoint_shape(tensor)
    value = float(tensor[...].float().reshape(-1)[0]) if math.prod(shape) == 1 else None
    if value is None or not (math.isfinite(value) and value > 0):
        raise ValueError(f"checkpoint tensor {name!r}: a KV cache scale must be one positive "
                         f"finite number, got {'shape ' + str(shape) if value is None else value}")
    for attribute in _SCALES[suffix]:
        setattr(attention, attribute, value)
    return True
