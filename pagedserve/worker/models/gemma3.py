"""Gemma 3 text decoder (`Gemma3ForCausalLM`, model type `gemma3_text`) over the paged pool.

Llama's layout (layers/linear.py's tensor-parallel q/k/v, o, gate/up, down), with
Gemma's differences:
- interleaved attention: most layers attend over a sliding window, every few a
  full one (config.json's `layer_types`), each kind with its own rotary table
  (`rope_parameters` per layer type: a local base, and a scaled global one);
- an RMSNorm over each q and k head, and softmax scale query_pre_attn_scalar^-0.5;
- four norms per layer: before and after attention, before and after the MLP,
  each output norm applied before the residual add;
- RMSNorm weights stored as w and applied as (1 + w), in float32;
- embeddings scaled by sqrt(hidden_size); a GELU (tanh) MLP; the LM head tied
  to the embedding, and the logits soft-capped when final_logit_softcapping is set.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedserve.model.shape import ModelShape
from pagedserve.worker.distributed import TPGroup
from pagedserve.worker.layers.attention import Attention, AttentionMetadata, KVCache
from pagedserve.worker.layers.linear import QKVParallelLinear, RowParallelLinear
from pagedserve.worker.layers.rotary import Rope, RotaryEmbedding
from pagedserve.worker.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from pagedserve.worker.models.llama import LlamaForCausalLM, LlamaMLP

SLIDING, FULL = "sliding_attention", "full_attention"


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + w), in float32, cast back: the checkpoint stores w."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.float()
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


class Gemma3Attention(nn.Module):
    def __init__(self, config, tp: TPGroup, index: int) -> None:
        super().__init__()
        shape = ModelShape.from_config(config)
        self.head_dim = shape.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, shape.num_heads,
                                          shape.num_kv_heads, shape.qkv_bias, tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(shape.num_heads * self.head_dim, config.hidden_size,
                                        shape.o_proj_bias, tp)
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim,
                              window=shape.layer_windows[index],
                              scale=config.query_pre_attn_scalar ** -0.5)

    def forward(self, rope: Rope, hidden: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(num_tokens, self.num_heads, self.head_dim))
        k = self.k_norm(k.reshape(num_tokens, self.num_kv_heads, self.head_dim))
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = RotaryEmbedding.apply(rope, q.contiguous(), k.contiguous())
        out = self.attn(q, k, v, kv_cache, metadata)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config, tp: TPGroup, index: int) -> None:
        super().__init__()
        self.sliding = ModelShape.from_config(config).layer_windows[index] is not None
        self.self_attn = Gemma3Attention(config, tp, index)
        self.mlp = LlamaMLP(config, tp)
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(self, ropes: dict[bool, Rope], hidden: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        attended = self.self_attn(ropes[self.sliding], self.input_layernorm(hidden), kv_cache,
                                  metadata)
        hidden = hidden + self.post_attention_layernorm(attended)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(mlp)


class Gemma3Model(nn.Module):
    def __init__(self, config, max_position: int, tp: TPGroup) -> None:
        super().__init__()
        head_dim = ModelShape.from_config(config).head_dim
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        # One table per kind of layer, looked up once per step.
        self.rotary = RotaryEmbedding(config, head_dim, max_position, layer_type=FULL)
        self.rotary_local = RotaryEmbedding(config, head_dim, max_position, layer_type=SLIDING)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, tp, index)
                                    for index in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)


class Gemma3ForCausalLM(nn.Module):
    stacked_params = LlamaForCausalLM.stacked_params  # the same fused q/k/v and gate/up

    def __init__(self, config, max_position: int, tp: TPGroup = TPGroup(),
                 expert_parallel: bool = False) -> None:
        super().__init__()
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError("attn_logit_softcapping (Gemma 2's) is not supported")
        self.config = config
        self.model = Gemma3Model(config, max_position, tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.weight = self.model.embed_tokens.weight
        self.softcap = getattr(config, "final_logit_softcapping", None)
        # sqrt(hidden_size), cast with the model to its dtype, as transformers rounds it.
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size ** 0.5),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden_size] (before the final norm)."""
        hidden = self.model.embed_tokens(input_ids) * self.embed_scale
        ropes = {False: self.model.rotary.lookup(positions),
                 True: self.model.rotary_local.lookup(positions)}
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            hidden = layer(ropes, hidden, kv_cache, metadata)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """As LlamaForCausalLM's: [S, hidden_size] -> [S, vocab_size] float32 on rank 0."""
        logits = self.lm_head.compute_logits(self.model.norm(hidden))
        if logits is None:
            return None
        logits = logits.float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
