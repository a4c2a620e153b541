"""EAGLE heads for tests: random checkpoints in the published layouts, and a dense
reference that drafts from HF transformers' hidden states of the target.

The reference follows the published heads (SafeAILab's EAGLE and EAGLE-3, as
vLLM and SGLang run them) in plain torch: causal attention over every row at
once, recomputed from scratch for each proposal, with no paging, so a paged
head that drafts otherwise (a row at the wrong position, a stale row, a feature
of the wrong token) proposes other tokens than it does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb


def _normal(generator: torch.Generator, *shape: int, std: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * std


def build_eagle_head(path: Path, target_dir: Path, method: str, *, seed: int = 0,
                     own_embedding: bool = False, draft_vocab_size: int | None = None
                     ) -> Path:
    """A random `method` head ("eagle" or "eagle3") for the target at `target_dir`, in the
    published layout: config.json and model.safetensors, no tokenizer."""
    target = json.loads((target_dir / "config.json").read_text())
    hidden, heads = target["hidden_size"], target["num_attention_heads"]
    kv_heads = target.get("num_key_value_heads", heads)
    head_dim, vocab = hidden // heads, target["vocab_size"]
    inner = target["intermediate_size"]
    g = torch.Generator().manual_seed(seed)
    layer = "layers.0." if method == "eagle" else "midlayer."
    width = hidden if method == "eagle" else 2 * hidden
    tensors = {
        f"{layer}self_attn.q_proj.weight": _normal(g, heads * head_dim, width),
        f"{layer}self_attn.k_proj.weight": _normal(g, kv_heads * head_dim, width),
        f"{layer}self_attn.v_proj.weight": _normal(g, kv_heads * head_dim, width),
        f"{layer}self_attn.o_proj.weight": _normal(g, hidden, heads * head_dim),
        f"{layer}mlp.gate_proj.weight": _normal(g, inner, hidden),
        f"{layer}mlp.up_proj.weight": _normal(g, inner, hidden),
        f"{layer}mlp.down_proj.weight": _normal(g, hidden, inner),
        f"{layer}post_attention_layernorm.weight": 1 + _normal(g, hidden),
    }
    config = dict(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, intermediate_size=inner, vocab_size=vocab,
                  rms_norm_eps=target["rms_norm_eps"], max_position_embeddings=256)
    if method == "eagle":
        tensors["fc.weight"] = _normal(g, hidden, 2 * hidden)
        config.update(architectures=["LlamaForCausalLM"], bias=False)
    else:
        draft_vocab = draft_vocab_size or vocab
        targets = torch.randperm(vocab, generator=g)[:draft_vocab].sort().values
        tensors.update({
            "fc.weight": _normal(g, hidden, 3 * hidden),
            f"{layer}input_layernorm.weight": 1 + _normal(g, hidden),
            f"{layer}hidden_norm.weight": 1 + _normal(g, hidden),
            "norm.weight": 1 + _normal(g, hidden),
            "lm_head.weight": _normal(g, draft_vocab, hidden),
            "d2t": targets - torch.arange(draft_vocab),
            "t2d": torch.zeros(vocab, dtype=torch.bool).index_fill_(0, targets, True),
        })
        config.update(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=draft_vocab)
    if own_embedding:
        tensors["embed_tokens.weight"] = _normal(g, vocab, hidden)
    path.mkdir(parents=True)
    LlamaConfig(**config).to_json_file(path / "config.json")
    save_file({name: t.contiguous() for name, t in tensors.items()}, path / "model.safetensors")
    return path


class ReferenceDrafter:
    """The head's greedy proposals, computed densely from the target's HF hidden states."""

    def __init__(self, method: str, head_dir: Path, target_dir: Path) -> None:
        self.method = method
        self.w = {name.replace("midlayer.", "layers.0."): t.float() if t.is_floating_point()
                  else t for name, t in load_file(head_dir / "model.safetensors").items()}
        self.config = LlamaConfig.from_json_file(head_dir / "config.json")
        self.target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
        self.rotary = LlamaRotaryEmbedding(self.config)
        num_layers = self.target.config.num_hidden_layers
        self.aux = (getattr(self.config, "eagle_aux_hidden_state_layer_ids", None)
                    or (2, num_layers // 2, num_layers - 3))

    @torch.no_grad()
    def propose(self, tokens: list[int], k: int) -> list[int]:
        """`tokens`: the sequence up to its newest (sampled, not yet computed) token."""
        states = self.target(torch.tensor([tokens[:-1]]), output_hidden_states=True
                             ).hidden_states
        if self.method == "eagle":
            features = states[-1][0]  # after the final norm
        else:
            features = self._linear(torch.cat([states[i][0] for i in self.aux], dim=-1), "fc")
        ids = list(tokens[1:])
        proposals = []
        for _ in range(k):
            out, nexts = self._rows(ids, features)
            token = self._greedy(out[-1])
            proposals.append(token)
            ids.append(token)
            features = torch.cat([features, nexts[-1:]])
        return proposals

    def _rows(self, ids: list[int], features: torch.Tensor):
        w, eps = self.w, self.config.rms_norm_eps
        embed = w.get("embed_tokens.weight", self.target.model.embed_tokens.weight)
        embeds = embed[torch.tensor(ids)]
        if self.method == "eagle":
            hidden = self._linear(torch.cat([embeds, features], dim=-1), "fc")
            residual, attn_in = hidden, hidden  # no input norm in EAGLE's layer
        else:
            residual = features
            attn_in = torch.cat([_rms(embeds, w["layers.0.input_layernorm.weight"], eps),
                                 _rms(features, w["layers.0.hidden_norm.weight"], eps)], dim=-1)
        residual = residual + self._attention(attn_in)
        mlp_in = _rms(residual, w["layers.0.post_attention_layernorm.weight"], eps)
        gate = self._linear(mlp_in, "layers.0.mlp.gate_proj")
        up = self._linear(mlp_in, "layers.0.mlp.up_proj")
        prenorm = residual + self._linear(torch.nn.functional.silu(gate) * up,
                                          "layers.0.mlp.down_proj")
        if self.method == "eagle":
            return prenorm, prenorm
        return _rms(prenorm, w["norm.weight"], eps), prenorm

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        rows, head_dim = x.shape[0], c.hidden_size // c.num_attention_heads
        q = self._linear(x, "layers.0.self_attn.q_proj").view(rows, -1, head_dim).transpose(0, 1)
        k = self._linear(x, "layers.0.self_attn.k_proj").view(rows, -1, head_dim).transpose(0, 1)
        v = self._linear(x, "layers.0.self_attn.v_proj").view(rows, -1, head_dim).transpose(0, 1)
        cos, sin = self.rotary(x, torch.arange(rows)[None])
        q, k = apply_rotary_pos_emb(q[None], k[None], cos, sin)
        repeat = c.num_attention_heads // c.num_key_value_heads
        k, v = k[0].repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)
        out = torch.nn.functional.scaled_dot_product_attention(q[0], k, v, is_causal=True)
        return self._linear(out.transpose(0, 1).reshape(rows, -1), "layers.0.self_attn.o_proj")

    def _greedy(self, row: torch.Tensor) -> int:
        if self.method == "eagle":  # the target's LM head, on the layer's output as it is
            return int((self.target.lm_head.weight @ row).argmax())
        draft = int((self.w["lm_head.weight"] @ row).argmax())
        return draft + int(self.w["d2t"][draft])

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        out = x @ self.w[f"{name}.weight"].T
        bias = self.w.get(f"{name}.bias")
        return out if bias is None else out + bias


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
