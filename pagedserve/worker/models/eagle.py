"""EAGLE heads: one decoder layer that drafts from the target's hidden states
(speculative decoding's `eagle` and `eagle3` methods; worker/eagle_draft.py runs them).

A head's row at position p reads the target's feature there and the token at p + 1,
and predicts the token at p + 2; a proposal's row reads the head's own output
at the row before in place of the target's feature.

- EAGLE (and EAGLE-2, the same checkpoints): the feature is the target's last
  hidden state after its final norm. `fc` joins [embedding; feature] into one
  vector, the layer runs without its input norm, and the target's LM head reads
  the layer's output (with no norm).
- EAGLE-3: the feature joins three of the target's layers' inputs (`fc`, 3 x
  hidden -> hidden; the layers `eagle_aux_hidden_state_layer_ids` names, else 2,
  L / 2 and L - 3). The layer attends over [norm(embedding); norm(feature)]
  (2 x hidden wide), a final norm and the head's own LM head over a smaller
  vocabulary follow, and `d2t` maps a draft id to the target's (target = draft +
  d2t[draft]).

Checkpoints load in their published layouts: EAGLE's `fc`, `layers.0.*` (no
`input_layernorm`); EAGLE-3's `fc`, `midlayer.*`, `norm`, `lm_head`, `d2t` (its
`t2d` mask is not needed). A head without `embed_tokens` shares the target's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pagedserve.model.checkpoint_files import checkpoint_tensors
from pagedserve.model.shape import ModelShape
from pagedserve.worker.distributed import TPGroup
from pagedserve.worker.layers import default_dtype
from pagedserve.worker.layers.attention import AttentionMetadata, KVCache
from pagedserve.worker.layers.linear import (
    QKVParallelLinear,
    ReplicatedLinear,
    pack_linear_weights,
)
from pagedserve.worker.layers.norm import RMSNorm
from pagedserve.worker.layers.rotary import RotaryEmbedding
from pagedserve.worker.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from pagedserve.worker.models import init_dummy, load_weights
from pagedserve.worker.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
)

# The targets whose hidden states a head reads: the Llama family's decoder.
TARGET_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM",
    "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"})


def aux_layers(head_config, num_target_layers: int) -> tuple[int, ...]:
    """The target layers whose inputs an EAGLE-3 head joins into its feature."""
    ids = getattr(head_config, "eagle_aux_hidden_state_layer_ids", None)
    if ids:
        return tuple(ids)
    return 2, num_target_layers // 2, num_target_layers - 3


class _Shared:
    """The target's modules a head reads, held outside the head's own parameters."""

    def __init__(self, target: LlamaForCausalLM) -> None:
        self.embed_tokens = target.model.embed_tokens
        self.lm_head = target.lm_head
        self.norm = target.model.norm
        self.target = target


class _Head(nn.Module):
    """What both heads have: the target's modules, an embedding (their own, or the
    target's), and a rotary table over the target's positions."""

    stacked_params = LlamaForCausalLM.stacked_params
    checkpoint_renames: list[tuple[str, str]] = []

    def __init__(self, config, max_position: int, target: LlamaForCausalLM,
                 own_embedding: bool, tp: TPGroup) -> None:
        super().__init__()
        self.shared = _Shared(target)
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
                             if own_embedding else None)
        self.rotary = RotaryEmbedding(config, ModelShape.from_config(config).head_dim,
                                      max_position)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (self.embed_tokens or self.shared.embed_tokens)(input_ids)


class EagleHead(_Head):
    """EAGLE: fc([embedding; feature]) -> a decoder layer without its input norm."""

    def __init__(self, config, max_position: int, target: LlamaForCausalLM,
                 own_embedding: bool, tp: TPGroup) -> None:
        super().__init__(config, max_position, target, own_embedding, tp)
        self.fc = ReplicatedLinear(2 * config.hidden_size, config.hidden_size,
                                   bias=bool(getattr(config, "bias", False)))
        self.layers = nn.ModuleList([LlamaDecoderLayer(config, tp)])
        self.layers[0].input_layernorm = nn.Identity()

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """The target's hidden states (before its final norm) -> the head's feature."""
        return self.shared.norm(hidden)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, features: torch.Tensor,
                kv_caches: list[KVCache], metadata: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (rows for the LM head, the feature for the next row), both [T, hidden]."""
        hidden = self.fc(torch.cat([self.embed(input_ids), features], dim=-1))
        rope = self.rotary.lookup(positions)
        out, residual = self.layers[0](rope, hidden, None, kv_caches[0], metadata)
        out = out + residual
        return out, out

    def greedy(self, rows: torch.Tensor) -> torch.Tensor | None:
        """The most likely target token of each row: the target's LM head, no norm. Rank 0
        gets them (the logits are gathered there); other ranks None."""
        logits = self.shared.lm_head.compute_logits(rows)
        return None if logits is None else logits.argmax(dim=-1)


class Eagle3Layer(nn.Module):
    def __init__(self, config, tp: TPGroup) -> None:
        super().__init__()
        shape = ModelShape.from_config(config)
        self.self_attn = LlamaAttention(config, tp)
        # q/k/v read [norm(embedding); norm(feature)]: twice the hidden size.
        self.self_attn.qkv_proj = QKVParallelLinear(2 * config.hidden_size, shape.head_dim,
                                                    shape.num_heads, shape.num_kv_heads,
                                                    shape.qkv_bias, tp)
        self.mlp = LlamaMLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm_before_residual = bool(getattr(config, "norm_before_residual", False))

    def forward(self, rope, embeds: torch.Tensor, features: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        normed = self.hidden_norm(features)
        residual = normed if self.norm_before_residual else features
        hidden = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
        hidden = self.self_attn(rope, hidden, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class Eagle3Head(_Head):
    """EAGLE-3: a layer over [norm(embedding); norm(feature)], a final norm, and its own
    LM head over `draft_vocab_size` tokens, mapped to the target's by `d2t`."""

    checkpoint_renames = [("midlayer.", "layers.0.")]

    def __init__(self, config, max_position: int, target: LlamaForCausalLM,
                 own_embedding: bool, tp: TPGroup) -> None:
        super().__init__(config, max_position, target, own_embedding, tp)
        draft_vocab = getattr(config, "draft_vocab_size", None) or config.vocab_size
        target_hidden = getattr(config, "target_hidden_size", None) or config.hidden_size
        self.fc = ReplicatedLinear(3 * target_hidden, config.hidden_size, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(config, tp)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ParallelLMHead(draft_vocab, config.hidden_size, tp)
        self.d2t = nn.Parameter(torch.zeros(draft_vocab, dtype=torch.int64), requires_grad=False)

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """The target's layer inputs kept in its last forward -> the head's feature."""
        return self.fc(torch.cat(self.shared.target.aux_hidden, dim=-1))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, features: torch.Tensor,
                kv_caches: list[KVCache], metadata: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        rope = self.rotary.lookup(positions)
        out, residual = self.layers[0](rope, self.embed(input_ids), features, kv_caches[0],
                                       metadata)
        return self.norm(out, residual)

    def greedy(self, rows: torch.Tensor) -> torch.Tensor | None:
        logits = self.lm_head.compute_logits(rows)
        if logits is None:
            return None
        draft_ids = logits.argmax(dim=-1)
        return draft_ids + self.d2t[draft_ids]


HEADS: dict[str, type[EagleHead] | type[Eagle3Head]] = {"eagle": EagleHead,
                                                        "eagle3": Eagle3Head}


def build_head(method: str, config, model_dir: Path, target: LlamaForCausalLM, *,
               max_position: int, dtype: torch.dtype, device: torch.device,
               load_format: str, tp: TPGroup = TPGroup()) -> EagleHead | Eagle3Head:
    """This rank's shard of the head, loaded from its checkpoint (random weights for
    "dummy"). Under tensor parallelism it is split like the target's layers: heads and
    MLP features by rank, the embedding and LM head by vocabulary rows; `fc` and `d2t`
    are whole on every rank."""
    tensors = {} if load_format == "dummy" else {
        name.removeprefix("model."): tensor for name, tensor in checkpoint_tensors(model_dir)
        if not name.endswith("t2d")}
    own_embedding = "embed_tokens.weight" in tensors
    with torch.device(device), default_dtype(dtype):
        head = HEADS[method](config, max_position, target, own_embedding, tp)
    head.to(dtype=dtype)
    if load_format == "dummy":
        init_dummy(head)
    else:
        load_weights(head, tensors.items(), str(model_dir))
    head.eval().requires_grad_(False)
    if device.type == "cpu":
        pack_linear_weights(head)
    return head
