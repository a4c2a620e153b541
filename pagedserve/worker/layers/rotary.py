"""Rotary position embeddings with a precomputed cos/sin table.

Scaled variants (Llama 3, linear, YaRN, LongRoPE) take their inverse
frequencies from transformers' own `ROPE_INIT_FUNCTIONS`, so each matches the
reference model by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pagedserve.kernels import cpu_kernels
from pagedserve.worker.layers import default_dtype

# These change their frequencies with the running sequence length, which a
# fixed table (shared by every sequence in a batch) cannot express.
_LENGTH_DEPENDENT = {"dynamic", "longrope"}


def rope_parameters(hf_config, layer_type: str | None = None) -> dict:
    """The model's RoPE settings, in transformers 5 form (rope_type + rope_theta inside);
    of one kind of layer, where they differ by layer type (Gemma 3's)."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:  # configs saved by older transformers
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    if layer_type is not None:
        params = params[layer_type]
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


class RotaryEmbedding(nn.Module):
    def __init__(self, hf_config, head_dim: int, max_position: int,
                 layer_type: str | None = None) -> None:
        super().__init__()
        with default_dtype(torch.float32):  # the table is built in float32, then cast
            cos, sin = _table(hf_config, head_dim, max_position, layer_type)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def lookup(self, positions: torch.Tensor) -> Rope:
        """A step's rotation, looked up once and applied in every layer.

        The table is cast with the model (`module.to(dtype)`), as transformers
        casts its float32 cos/sin to the activations' dtype. A float32 table on
        the CPU rotates in place through the C++ kernel; otherwise the rows of
        the step's positions are gathered here, once.
        """
        if (self.cos.device.type == "cpu" and self.cos.dtype == torch.float32
                and cpu_kernels.usable()):
            return Rope(positions.to(torch.int64).contiguous(), table=self)
        return Rope(positions, self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))

    @staticmethod
    def apply(rope: Rope, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, H, D]; k: [T, H_kv, D] (rotate-half layout), rotated by `rope` (in place
        when the kernel does it)."""
        if rope.table is not None:
            cpu_kernels.rotary_(q, k, rope.table.cos, rope.table.sin, rope.positions)
            return q, k
        return _rotate(q, rope.cos, rope.sin), _rotate(k, rope.cos, rope.sin)

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(self.lookup(positions), q, k)


@dataclass
class Rope:
    """A step's positions and how they rotate: the rows of cos and sin ([T, 1, D] each),
    or the table the CPU kernel reads them from."""

    positions: torch.Tensor
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    table: RotaryEmbedding | None = None


def _table(hf_config, head_dim: int, max_position: int,
           layer_type: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [max_position, head_dim], float32."""
    params = rope_parameters(hf_config, layer_type)
    rope_type = params["rope_type"]
    if rope_type == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        inv_freq, scaling = 1.0 / (params["rope_theta"] ** exponents), 1.0
    elif rope_type in ROPE_INIT_FUNCTIONS and rope_type not in _LENGTH_DEPENDENT:
        kwargs = {} if layer_type is None else {"layer_type": layer_type}
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu", **kwargs)
    else:
        raise ValueError(f"rope_type={rope_type!r} is not supported "
                         "(supported: default, "
                         f"{', '.join(sorted(set(ROPE_INIT_FUNCTIONS) - _LENGTH_DEPENDENT))})")
    positions = torch.arange(max_position, dtype=torch.float32)
    # transformers builds inv_freq on the CPU; the table goes where the model is built.
    freqs = positions[:, None] * inv_freq.float().to(positions.device)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
