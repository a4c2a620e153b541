"""Model shapes and the memory they take: what planning and simulation need.

The numbers of an HF config.json that memory and step time depend on
(`ModelShape`), read once here for every layer: the engine and its workers
read a loaded config through `ModelShape.from_config`, the planner and the
simulated GPU a config.json's dict. Also the bundled presets of well-known
models, and per-rank parameter, weight-byte and activation figures. Pure
arithmetic: no torch, no weights. The planner (planner.py) reports them; the
simulated accelerator (worker/simulated.py) sizes its KV pool and times its
steps with them; the rules they feed are in rules.py.

A quantized checkpoint (model/quant_scheme.py reads its `quantization_config`,
or model.quantization="fp8" asks for one) quantizes its linear layers only, so
one rank's weight bytes are two sums (weight_bytes_per_rank):

    linear weights (q, k, v, o; gate, up, down; every expert's)  x the scheme's
        bytes a weight, scales included (W4A16 in groups of 128: 0.52; FP8: 1.0)
  + everything else (embedding, LM head, norms, biases, MoE router) x the model
        dtype's bytes (compressed-tensors checkpoints `ignore` the LM head; AWQ,
        GPTQ and Qwen's FP8 keep it, the embedding and the router in float too)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

from pagedserve.math_utils import cdiv
from pagedserve.model.quant_scheme import WeightScheme, scheme_of

GIB = 2**30
# CUDA context, NCCL buffers and caching-allocator slack: outside any tensor we size.
RUNTIME_OVERHEAD_BYTES = GIB
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The key a preset adds to the HF config.json it copies: the hub ids it stands for.
PRESET_HUB_IDS_KEY = "pagedserve_hub_ids"


class HFConfig(Protocol):
    """A loaded HF config (transformers' PretrainedConfig), as far as a shape reads it."""

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ModelShape:
    """The numbers of an HF config.json that memory depends on."""

    source: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context_limit: int  # max_position_embeddings
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    saved_dtype: str | None
    qk_norm: bool = False  # an RMSNorm over each q and k head (Qwen3)
    # Mixture of experts: 0 experts for a dense model.
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    renormalize_topk: bool = True  # the top-k weights scaled to sum to one
    sparse_layers: tuple[int, ...] = ()  # the layers whose MLP is a mixture of experts
    # Each layer's sliding window (a query sees its last `window` positions), None for a
    # layer of full attention: Mistral's every layer, Qwen2's past max_window_layers.
    layer_windows: tuple[int | None, ...] = ()
    # How the linear layers' weights are held: the checkpoint's quantization (or
    # model.quantization="fp8"'s); None for float weights, and for a quantized
    # checkpoint under model.quantization="dequantize".
    weight_scheme: WeightScheme | None = None

    @classmethod
    def from_config(cls, config: HFConfig, source: str = "the model",
                    quantization: str = "auto") -> ModelShape:
        """The shape of a loaded config, read as its config.json would be."""
        return cls.from_hf_config(config.to_dict(), source, quantization)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], source: str,
                       quantization: str = "auto") -> ModelShape:
        """`quantization` is model.quantization: a quantization_config that no kernel of
        ours runs is refused here, naming it (model/quant_scheme.py)."""
        missing = [key for key in ("vocab_size", "hidden_size", "intermediate_size",
                                   "num_hidden_layers", "num_attention_heads",
                                   "max_position_embeddings") if hf.get(key) is None]
        if missing:
            raise ValueError(f"{source}: the model config has no {', '.join(missing)}")
        heads = hf["num_attention_heads"]
        attention_bias = bool(hf.get("attention_bias", False))
        model_type = hf.get("model_type", "llama")
        return cls(
            source=source,
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            context_limit=hf["max_position_embeddings"],
            # Llama, Mistral and Qwen2 configs default to untied embeddings.
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # As the model builds them: Qwen2 always has q/k/v biases.
            qkv_bias=attention_bias or hf.get("model_type") == "qwen2",
            o_proj_bias=attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            saved_dtype=hf.get("dtype") or hf.get("torch_dtype"),
            qk_norm=model_type in QK_NORM_MODEL_TYPES,
            layer_windows=_layer_windows(hf),
            weight_scheme=_held_scheme(hf, quantization, source),
            **_experts(hf),
        )

    @property
    def window_of_every_layer(self) -> int | None:
        """The window when every layer has one (the largest of them), else None: the blocks
        before it are read by no layer and can be freed (scheduler/block_manager.py)."""
        if not self.layer_windows or None in self.layer_windows:
            return None
        return max(w for w in self.layer_windows if w is not None)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def kv_bytes_per_token(self, tp: int, dtype_bytes: int) -> int:
        """KV bytes of one token on one rank: its share of the KV heads, every layer
        (`dtype_bytes`: the KV cache's, rules.kv_dtype_bytes)."""
        return 2 * self.num_layers * (self.num_kv_heads // tp) * self.head_dim * dtype_bytes

    def linear_weight_bytes(self, dtype_bytes: int) -> float:
        """The bytes one weight of a linear layer is held in: the scheme's, its share of
        the scales (held in the model dtype) included, or the model dtype's."""
        if self.weight_scheme is None:
            return dtype_bytes
        return self.weight_scheme.bytes_per_weight(dtype_bytes)


def _held_scheme(hf: dict[str, Any], quantization: str, source: str) -> WeightScheme | None:
    """The scheme the linear weights are held in. Read (and refused where we run no kernel
    for it) whatever model.quantization asks; under "dequantize" they are held in float."""
    scheme = scheme_of(hf, quantization, source)
    return None if quantization == "dequantize" else scheme


QK_NORM_MODEL_TYPES = frozenset({"qwen3", "qwen3_moe", "gemma3_text"})
# Models with a norm before and after the MLP too (four per layer, not two).
SANDWICH_NORM_MODEL_TYPES = frozenset({"gemma3_text"})


def _layer_windows(hf: dict[str, Any]) -> tuple[int | None, ...]:
    """Each layer's sliding window: config.json's `layer_types` where it has them (Qwen2
    and Qwen3 write them, from use_sliding_window and max_window_layers; Gemma 3 from
    sliding_window_pattern, every sixth layer global), else `sliding_window` on every
    layer (Mistral, Mixtral)."""
    layers = hf["num_hidden_layers"]
    window = hf.get("sliding_window")
    if window is None or hf.get("use_sliding_window") is False:
        return (None,) * layers
    types = hf.get("layer_types")
    if types is None and hf.get("model_type") == "gemma3_text":  # as Gemma3TextConfig fills it
        pattern = hf.get("sliding_window_pattern", 6)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                 for i in range(layers)]
    if types is None:
        return (window,) * layers
    return tuple(window if kind == "sliding_attention" else None for kind in types)


def _experts(hf: dict[str, Any]) -> dict[str, Any]:
    """The MoE fields of a config.json: Mixtral's (`num_local_experts`, every layer
    sparse) or Qwen3-MoE's (`num_experts`, `moe_intermediate_size`, and the dense
    layers that `decoder_sparse_step` and `mlp_only_layers` leave)."""
    experts = hf.get("num_local_experts") or hf.get("num_experts") or 0
    if not experts:
        return {}
    layers = hf["num_hidden_layers"]
    step = hf.get("decoder_sparse_step") or 1
    dense = set(hf.get("mlp_only_layers") or ())
    return {"num_experts": experts, "experts_per_token": hf.get("num_experts_per_tok") or 2,
            "expert_intermediate_size": hf.get("moe_intermediate_size")
            or hf["intermediate_size"],
            # Mixtral has no such key and renormalizes; Qwen3-MoE's config says.
            "renormalize_topk": bool(hf.get("norm_topk_prob", True)),
            "sparse_layers": tuple(i for i in range(layers)
                                   if i not in dense and (i + 1) % step == 0)}


def head_dim(config: HFConfig) -> int:
    """The width of one attention head of a loaded config (ModelShape's rule)."""
    return ModelShape.from_config(config).head_dim


def load_presets() -> dict[str, dict[str, Any]]:
    """Bundled HF configs of well-known models, by preset name (the file's stem)."""
    folder = resources.files("pagedserve").joinpath("presets")
    return {entry.name.removesuffix(".json"): json.loads(entry.read_text())
            for entry in sorted(folder.iterdir(), key=lambda entry: entry.name)
            if entry.name.endswith(".json")}


def preset_for(hub_id: str) -> dict[str, Any] | None:
    """The bundled config of a hub id, if a preset stands for it."""
    return next((hf for hf in load_presets().values() if hub_id in hf[PRESET_HUB_IDS_KEY]),
                None)


def _widths(shape: ModelShape, tp: int) -> tuple[int, int]:
    """One rank's query and KV widths: its heads x head_dim."""
    return (shape.num_heads // tp * shape.head_dim, shape.num_kv_heads // tp * shape.head_dim)


def linear_params_per_rank(shape: ModelShape, tp: int) -> int:
    """The weights of one rank's linear layers, those a quantized checkpoint quantizes:
    q, k, v and o, a dense MLP's gate, up and down, and 1/tp of every expert's (not
    their biases, the router, the norms, the embedding or the LM head)."""
    hidden, inter = shape.hidden_size, shape.intermediate_size // tp
    q, kv = _widths(shape, tp)
    attention = hidden * (q + 2 * kv) + q * hidden
    sparse = len(shape.sparse_layers)
    experts = shape.num_experts * 3 * hidden * shape.expert_intermediate_size // tp
    return (shape.num_layers * attention + (shape.num_layers - sparse) * 3 * hidden * inter
            + sparse * experts)


def params_per_rank(shape: ModelShape, tp: int) -> int:
    """The parameters one rank holds: 1/tp of the heads, the MLPs and the vocabulary;
    of each MoE layer, the whole router and 1/tp of the experts' weights (1/tp of every
    expert's features, or under expert parallelism 1/tp of the experts whole: the same
    count)."""
    hidden, inter = shape.hidden_size, shape.intermediate_size // tp
    q, kv = _widths(shape, tp)
    biases = (q + 2 * kv) * shape.qkv_bias + hidden * shape.o_proj_bias
    norms = 4 if shape.model_type in SANDWICH_NORM_MODEL_TYPES else 2
    # Besides its linear weights, a layer has its biases, q/k norms and input and
    # post-attention RMSNorm (Gemma: four).
    layer = biases + 2 * shape.head_dim * shape.qk_norm + norms * hidden
    sparse = len(shape.sparse_layers)
    mlp_bias = (2 * inter + hidden) * shape.mlp_bias
    router = shape.num_experts * hidden
    embedding = cdiv(shape.vocab_size, tp) * hidden
    lm_head = 0 if shape.tie_word_embeddings else embedding
    return (linear_params_per_rank(shape, tp) + shape.num_layers * layer
            + (shape.num_layers - sparse) * mlp_bias + sparse * router
            + embedding + lm_head + hidden)  # + final norm


def weight_bytes_per_rank(shape: ModelShape, tp: int, dtype_bytes: int) -> int:
    """The bytes of one rank's weights: its linear layers' at shape.linear_weight_bytes
    (the weight scheme's), every other parameter in the model dtype. The planner and the
    simulated GPU both hold the model to this."""
    linear = linear_params_per_rank(shape, tp)
    other = params_per_rank(shape, tp) - linear
    return round(linear * shape.linear_weight_bytes(dtype_bytes)) + other * dtype_bytes


def active_params(shape: ModelShape) -> int:
    """The parameters one token's forward pass reads: all of a dense model's, and of each
    MoE layer the router and only the top-k experts the token is routed to."""
    unused = shape.num_experts - shape.experts_per_token
    per_expert = 3 * shape.hidden_size * shape.expert_intermediate_size
    return params_per_rank(shape, 1) - len(shape.sparse_layers) * unused * per_expert


def lora_slot_bytes(shape: ModelShape, tp: int, dtype_bytes: int, max_loras: int,
                    max_rank: int) -> int:
    """The LoRA slots of one rank (worker/worker_lora.py): per layer and slot, an A of
    [rank, in] and a B of [out, rank] for each of q, k, v, o, and gate, up, down where
    the MLP is dense (experts take no adapter), sharded as their layers are
    (column-parallel B by rows, row-parallel A by columns)."""
    hidden, inter = shape.hidden_size, shape.intermediate_size // tp
    q, kv = _widths(shape, tp)
    attention = 3 * hidden + q + (q + 2 * kv) + hidden  # qkv and o: inputs and outputs
    mlp = 2 * hidden + inter + 2 * inter + hidden  # gate_up and down, of a dense MLP only
    dense = shape.num_layers - len(shape.sparse_layers)
    return ((shape.num_layers * attention + dense * mlp) * max_loras * max_rank
            * dtype_bytes)


def headroom_bytes(shape: ModelShape, tp: int, dtype_bytes: int, step_tokens: int,
                    max_num_seqs: int) -> int:
    """See planner.plan: runtime overhead, one step's peak activations, rank 0's logits."""
    qkv = (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim // tp
    mlp = 3 * shape.intermediate_size // tp
    if shape.is_moe:  # each of a token's k experts: gate, up and its output (layers/moe.py),
        # at an expert's whole width, as expert parallelism computes it
        mlp = max(mlp, shape.experts_per_token
                  * (3 * shape.expert_intermediate_size + shape.hidden_size))
    per_token = 4 * shape.hidden_size + qkv + mlp
    logits = max_num_seqs * shape.vocab_size * 4 * 2
    return RUNTIME_OVERHEAD_BYTES + step_tokens * per_token * dtype_bytes + logits
