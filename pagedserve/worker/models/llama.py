"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3; with experts, Mixtral and
Qwen3-MoE) over the paged KV pool.

Tokens of every scheduled sequence are flattened into one batch of shape
[num_tokens]; attention finds each sequence's context through the block table,
so nothing here is padded. q/k/v and gate/up are fused into one matmul each;
the loader fills them from the checkpoint's separate tensors.

With a tensor-parallel group of size tp, each rank holds 1/tp of the heads and
of the MLP's intermediate features (see layers/linear.py), its own KV heads'
pool, and 1/tp of the vocabulary rows; o_proj, down_proj and the embedding each
end in one all-reduce.

The family's variations, read from the config's shape (model/shape.py): a
layer may attend over a sliding window (Mistral's every layer, Qwen2's past
max_window_layers), Qwen3 normalizes each q and k head before the rotary
embedding, and a
mixture-of-experts layer (layers/moe.py) takes the place of the MLP in the
layers `ModelShape.sparse_layers` names (every layer of Mixtral; Qwen3-MoE's
`decoder_sparse_step` and `mlp_only_layers` leave some dense). Mixtral's
checkpoint calls that block `block_sparse_moe`, Qwen3-MoE's `mlp`; here it is
`mlp` in both (`checkpoint_renames`).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.kernels import cpu_kernels
from pagedserve.model.shape import ModelShape, head_dim
from pagedserve.worker.distributed import TPGroup
from pagedserve.worker.layers.attention import Attention, AttentionMetadata, KVCache
from pagedserve.worker.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from pagedserve.worker.layers.moe import FusedMoE
from pagedserve.worker.layers.norm import RMSNorm
from pagedserve.worker.layers.rotary import Rope, RotaryEmbedding
from pagedserve.worker.layers.vocab import ParallelLMHead, VocabParallelEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, config, tp: TPGroup, index: int = 0) -> None:
        super().__init__()
        shape = ModelShape.from_config(config)
        self.head_dim = shape.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim,
                                          shape.num_heads, shape.num_kv_heads,
                                          shape.qkv_bias, tp)
        # Heads and sizes of this rank.
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim,
                                        config.hidden_size, shape.o_proj_bias, tp)
        # Mistral's sliding window, or Qwen2's on the layers past max_window_layers.
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim,
                              window=shape.layer_windows[index])
        if shape.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = shape.qk_norm

    def forward(self, rope: Rope, hidden: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split_with_sizes(
            [self.q_size, self.kv_size, self.kv_size], dim=-1)  # not Tensor.split's Python
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = RotaryEmbedding.apply(rope, q, k)
        out = self.attn(q, k, v, kv_cache, metadata)  # [T, H, D]
        return self.o_proj(out.reshape(num_tokens, self.q_size))


# The gate's activation, by the config's hidden_act (Gemma's hidden_activation).
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


class LlamaMLP(nn.Module):
    def __init__(self, config, tp: TPGroup) -> None:
        super().__init__()
        bias = ModelShape.from_config(config).mlp_bias
        size = config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [size, size], bias, tp,
                                                 "intermediate_size")
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias, tp, "intermediate_size")
        self.intermediate_size = self.gate_up_proj.part_sizes[0]  # this rank's
        name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
        if name not in ACTIVATIONS:
            raise ValueError(f"hidden_act={name!r} is not supported (supported: "
                             f"{', '.join(ACTIVATIONS)})")
        self.act = ACTIVATIONS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if (self.act is F.silu and gate_up.device.type == "cpu"
                and gate_up.dtype == torch.float32 and cpu_kernels.usable()):
            return self.down_proj(cpu_kernels.silu_and_mul(gate_up))  # one op, not three
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act(gate) * up)


class SparseMoE(nn.Module):
    """The router (replicated on every rank) and the layer's experts."""

    def __init__(self, config, tp: TPGroup, expert_parallel: bool) -> None:
        super().__init__()
        shape = ModelShape.from_config(config)
        self.gate = ReplicatedLinear(config.hidden_size, shape.num_experts, bias=False)
        self.experts = FusedMoE(shape.num_experts, shape.experts_per_token, config.hidden_size,
                                shape.expert_intermediate_size, shape.renormalize_topk, tp,
                                expert_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, tp: TPGroup, index: int = 0, expert_parallel: bool = False
                 ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, tp, index)
        sparse = index in ModelShape.from_config(config).sparse_layers
        self.mlp = SparseMoE(config, tp, expert_parallel) if sparse else LlamaMLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, rope: Rope, hidden: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: KVCache, metadata: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: the previous layer's MLP output (the embeddings in the first layer,
        where `residual` is None); residual: the sum of everything before it. Returns
        this layer's MLP output and the residual stream before it."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(rope, hidden, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, max_position: int, tp: TPGroup, expert_parallel: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        # One table for every layer, looked up once per step: a buffer, not a parameter.
        self.rotary = RotaryEmbedding(config, head_dim(config), max_position)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, tp, index, expert_parallel)
                                    for index in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    # Checkpoint tensors that land in a slice of one of our fused parameters:
    # (our name, checkpoint name, shard index within the fused output dim).
    stacked_params = [
        ("qkv_proj", "q_proj", 0),
        ("qkv_proj", "k_proj", 1),
        ("qkv_proj", "v_proj", 2),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    ]
    # Checkpoint name parts that are named otherwise here: (checkpoint's, ours).
    checkpoint_renames = [(".block_sparse_moe.", ".mlp.")]

    def __init__(self, config, max_position: int, tp: TPGroup = TPGroup(),
                 expert_parallel: bool = False) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_position, tp, expert_parallel)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
        # The layers whose inputs (the residual stream there) the last forward keeps in
        # `aux_hidden`, in this order, for an EAGLE-3 head (models/eagle.py); none by default.
        self.aux_layers: tuple[int, ...] = ()
        self.aux_hidden: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden_size] (before the final norm)."""
        hidden = self.model.embed_tokens(input_ids)
        rope = self.model.rotary.lookup(positions)
        residual = None
        kept = {}  # an EAGLE-3 head reads the inputs of the layers aux_layers names
        for index, (layer, kv_cache) in enumerate(zip(self.model.layers, kv_caches,
                                                      strict=True)):
            if index in self.aux_layers:
                kept[index] = hidden if residual is None else residual + hidden
            hidden, residual = layer(rope, hidden, residual, kv_cache, metadata)
        if kept:
            self.aux_hidden = [kept[index] for index in self.aux_layers]
        return residual + hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Only for the rows that sample: [S, hidden_size] -> [S, vocab_size] float32.

        Rank 0 gets the logits over the whole vocabulary; other ranks get None.
        """
        logits = self.lm_head.compute_logits(self.model.norm(hidden))
        return None if logits is None else logits.float()
