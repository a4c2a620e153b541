"""Capacity planning: what one replica of a config holds, from shapes alone.

Before renting GPUs one wants to know whether the weights fit, how many KV
blocks are left and how many sequences those serve. All of it follows from
the model's config.json and the tensor-parallel sharding, so the planner reads
no weights and allocates no tensors. The config comes from a local model
directory, a bundled preset for well-known hub ids, or the config the random
test model is built with.

Every figure is per tensor-parallel rank (one GPU) unless named otherwise.
Block ids are global, so every rank holds the same number of blocks; rank 0,
which also holds the full logits, is the one planned for.

A quantized checkpoint's linear layers are planned at the bytes its scheme
holds them in (model/shape.py, weight_bytes_per_rank), and the KV cache at
engine.kv_cache_dtype's bytes (model/rules.py, kv_dtype_bytes), as the
simulated GPU holds them, and as the GPU worker's kernels run them
(kernels/quant_gemm.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagedserve.config import TP_ACROSS_NODES, Config, ModelConfig, RandomModelSpec
from pagedserve.math_utils import cdiv
from pagedserve.model import rules
from pagedserve.model.quant_scheme import WeightScheme
from pagedserve.model.rules import (
    check_pool_holds_a_sequence,
    check_tensor_parallel,
    cpu_kv_budget,
    format_bytes,
    gpu_kv_budget,
    kv_dtype_bytes,
    served_dtype,
)
from pagedserve.model.shape import (
    DTYPE_BYTES,
    GIB,
    PRESET_HUB_IDS_KEY,
    ModelShape,
    active_params,
    headroom_bytes,
    linear_params_per_rank,
    load_presets,
    lora_slot_bytes,
    params_per_rank,
    weight_bytes_per_rank,
)

__all__ = ["DEFAULT_GPU_MEMORY_GB", "Plan", "format_plan", "load_model_shape", "load_presets",
           "plan"]
DEFAULT_GPU_MEMORY_GB = 80.0


@dataclass(frozen=True)
class Plan:
    model: ModelShape
    dtype: str
    device: str  # "cuda" or "cpu"
    tensor_parallel_size: int  # GPUs (or CPU workers) one replica takes
    placement_strategy: str  # how the ranks' placement-group bundles go onto nodes
    block_size: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_dtype: str  # the model dtype's name, or engine.kv_cache_dtype's fp8 variant
    model_params: int  # the unsharded model
    active_params: int  # those one token runs: of a MoE model, only its top-k experts
    expert_parallel: bool  # a MoE model's experts placed whole on the ranks
    params_per_rank: int
    linear_params_per_rank: int  # those a quantized checkpoint quantizes (model.weight_scheme)
    weight_bytes_per_rank: int
    total_weight_bytes: int  # over all ranks: replicated norms and vocab padding included
    kv_bytes_per_token: int  # per rank: its share of the KV heads
    gpu_memory_bytes: int | None  # None on CPU, where engine.kv_cache_memory_gb is the budget
    gpu_memory_utilization: float | None
    headroom_bytes: int | None
    lora_bytes_per_rank: int  # the adapter slots (0 without lora.enable_lora)
    lora_slots: int
    kv_budget_bytes: int
    num_blocks: int
    num_cache_tokens: int
    mean_seq_len: int
    seqs_at_mean_len: int
    seqs_at_max_model_len: int  # if each sequence pre-allocated max_model_len tokens


def plan(config: Config, gpu_memory_gb: float | None = None,
         mean_seq_len: int | None = None) -> Plan:
    """Plan one replica of `config` on GPUs of `gpu_memory_gb` GiB (default 80).

    Weights per rank follow the model's sharding: q/k/v by heads, o_proj and
    down_proj by their input, gate/up by their output, embedding and LM head
    by vocab rows padded to a multiple of tp (shared when tied); norms and
    row-parallel biases are whole on every rank. A quantized checkpoint's linear
    layers take its scheme's bytes a weight (W4A16 in groups of 128: 0.52), the
    rest the model dtype's; KV values take 1 byte under an fp8 kv_cache_dtype.

    Activation headroom per rank, for a step of T = max_num_batched_tokens
    tokens with dtype bytes b:
        1 GiB (CUDA context, NCCL, allocator slack)
      + T * (4*hidden + (q + 2*kv)/tp + 3*intermediate/tp) * b
      + max_num_seqs * vocab * 4 * 2   (float32 logits and their softmax, rank 0)
    where q = heads * head_dim and kv = kv_heads * head_dim.

    KV budget = gpu_memory * gpu_memory_utilization - weights - LoRA slots - headroom;
    on a CPU config it is engine.kv_cache_memory_gb, as the engine takes it (the
    slots come on top). The LoRA slots: model/shape.py, lora_slot_bytes.

    What the engine refuses, the plan refuses with the engine's own rules
    (model/rules.py): tensor-parallel divisibility, max_model_len, dtype "auto",
    the GPU's KV budget and a pool smaller than one sequence.
    """
    engine, tp = config.engine, config.parallel.tensor_parallel_size
    shape = load_model_shape(config.model)
    expert_parallel = config.parallel.enable_expert_parallel
    check_tensor_parallel(shape, tp, expert_parallel)
    device = "cpu" if engine.device == "cpu" else "cuda"
    dtype = served_dtype(config.model.dtype, shape.saved_dtype, device)
    dtype_bytes = DTYPE_BYTES[dtype]
    max_model_len = rules.max_model_len(config.model.max_model_len, shape)
    mean_seq_len = max(1, max_model_len // 4) if mean_seq_len is None else mean_seq_len
    if not 1 <= mean_seq_len <= max_model_len:
        raise ValueError(f"mean_seq_len={mean_seq_len} must be between 1 and "
                         f"max_model_len={max_model_len}")
    step_tokens = engine.step_token_budget(device)

    params = params_per_rank(shape, tp)
    weight_bytes = weight_bytes_per_rank(shape, tp, dtype_bytes)
    kv_bytes_per_token = shape.kv_bytes_per_token(tp, kv_dtype_bytes(engine, dtype_bytes))
    block_bytes = engine.block_size * kv_bytes_per_token
    lora = config.lora
    lora_bytes = lora_slot_bytes(shape, tp, dtype_bytes, lora.max_loras, lora.max_lora_rank
                                 ) if lora.enable_lora else 0

    if device == "cpu":
        if gpu_memory_gb is not None:
            raise ValueError(f"gpu_memory_gb={gpu_memory_gb} applies to GPU configs; engine.device "
                             "is 'cpu', whose KV budget is engine.kv_cache_memory_gb")
        gpu_memory, utilization, headroom = None, None, None
        budget = cpu_kv_budget(engine)
    else:
        gpu_memory_gb = DEFAULT_GPU_MEMORY_GB if gpu_memory_gb is None else gpu_memory_gb
        if gpu_memory_gb <= 0:
            raise ValueError(f"gpu_memory_gb={gpu_memory_gb} must be positive")
        gpu_memory, utilization = int(gpu_memory_gb * GIB), engine.gpu_memory_utilization
        headroom = headroom_bytes(shape, tp, dtype_bytes, step_tokens, engine.max_num_seqs)
        budget = gpu_kv_budget(gpu_memory, utilization, weight_bytes + lora_bytes, headroom, tp)
    num_blocks = _num_blocks(config, budget, block_bytes, device, max_model_len)
    num_cache_tokens = num_blocks * engine.block_size
    return Plan(
        model=shape, dtype=dtype, device=device, tensor_parallel_size=tp,
        kv_cache_dtype=dtype if engine.kv_cache_dtype == "auto" else engine.kv_cache_dtype,
        placement_strategy=config.parallel.placement_strategy,
        block_size=engine.block_size, max_model_len=max_model_len,
        max_num_seqs=engine.max_num_seqs, max_num_batched_tokens=step_tokens,
        model_params=params_per_rank(shape, 1), active_params=active_params(shape),
        expert_parallel=expert_parallel, params_per_rank=params,
        linear_params_per_rank=linear_params_per_rank(shape, tp),
        weight_bytes_per_rank=weight_bytes, total_weight_bytes=weight_bytes * tp,
        kv_bytes_per_token=kv_bytes_per_token, gpu_memory_bytes=gpu_memory,
        gpu_memory_utilization=utilization,
        headroom_bytes=headroom, lora_bytes_per_rank=lora_bytes,
        lora_slots=lora.max_loras if lora.enable_lora else 0, kv_budget_bytes=budget,
        num_blocks=num_blocks,
        num_cache_tokens=num_cache_tokens, mean_seq_len=mean_seq_len,
        seqs_at_mean_len=num_blocks // cdiv(mean_seq_len, engine.block_size),
        seqs_at_max_model_len=num_cache_tokens // max_model_len,
    )


# -- the model config -------------------------------------------------------------------------

def load_model_shape(model: ModelConfig) -> ModelShape:
    """The shape from a local directory's config.json, a preset, or the random model's
    config, with its weights held as model.quantization asks. A GGUF file's own types
    are not planned: its weights are counted in the model dtype."""
    quantization = model.quantization
    if model.random_init is not None:
        spec = model.random_init
        return ModelShape.from_hf_config(_random_model_config(spec),
                                         f"model.random_init {spec.name!r} ({spec.arch})",
                                         quantization)
    if model.embedded is not None:  # planned from its preset: nothing is fetched
        return ModelShape.from_hf_config(load_presets()[model.embedded],
                                         f"model.embedded {model.embedded!r}")
    path = Path(model.path).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        from pagedserve.model import gguf_file  # torch and gguf: only for a GGUF file

        config = json.loads((gguf_file.metadata_dir(path) / "config.json").read_text())
        return ModelShape.from_hf_config(config, str(path))
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"model.path={model.path!r} is a directory without config.json")
        return ModelShape.from_hf_config(json.loads(config_file.read_text()), str(path),
                                         quantization)
    presets = load_presets()
    for name, hf in presets.items():
        if model.path in hf[PRESET_HUB_IDS_KEY]:
            return ModelShape.from_hf_config(hf, f"{model.path} (preset {name})", quantization)
    known = "; ".join(f"{name}: {', '.join(hf[PRESET_HUB_IDS_KEY])}"
                      for name, hf in presets.items())
    raise ValueError(f"model.path={model.path!r} is neither a local model directory nor a hub id "
                     f"with a bundled preset ({known}); point model.path at a directory holding "
                     "the model's config.json")


def _random_model_config(spec: RandomModelSpec) -> dict[str, Any]:
    """The config `cached_random_model` would write, without training a tokenizer or weights."""
    # Imported here: the module builds models, so it pulls in torch and tokenizers.
    from pagedserve.model.random_model import ARCHS, DEFAULT_VOCAB_SIZE, config_kwargs

    overrides = dict(spec.config_overrides)
    # vocab_size is build_random_model's own argument; without it the vocabulary is
    # the trained tokenizer's, DEFAULT_VOCAB_SIZE tokens on the bundled corpus.
    vocab_size = overrides.pop("vocab_size", None) or DEFAULT_VOCAB_SIZE
    kwargs = config_kwargs(spec.arch, overrides)
    return ARCHS[spec.arch](**kwargs, vocab_size=vocab_size).to_dict()


# -- memory -----------------------------------------------------------------------------------

def _num_blocks(config: Config, budget: int, block_bytes: int, device: str,
                max_model_len: int) -> int:
    """Blocks per rank, refused as the engine would refuse them."""
    engine = config.engine
    fit = budget // block_bytes
    if engine.num_gpu_blocks is None:
        num_blocks = fit
    elif device == "cuda" and engine.num_gpu_blocks > fit:
        raise ValueError(f"engine.num_gpu_blocks={engine.num_gpu_blocks} exceeds the {fit} blocks "
                         f"of {block_bytes} bytes that the KV budget of {format_bytes(budget)} "
                         "per GPU holds")
    else:
        num_blocks = engine.num_gpu_blocks
    check_pool_holds_a_sequence(num_blocks, engine, max_model_len, on_gpu=device == "cuda")
    return num_blocks


# -- report -----------------------------------------------------------------------------------

def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


_PLACEMENTS = {
    "STRICT_PACK": "all ranks on one node (STRICT_PACK)",
    "PACK": "on one node where one has room, else over several (PACK)",
    "SPREAD": "over as many nodes as there are (SPREAD)",
    "STRICT_SPREAD": "one rank per node (STRICT_SPREAD)",
}


def _placement(plan: Plan) -> str:
    where = _PLACEMENTS[plan.placement_strategy]
    if plan.placement_strategy == "STRICT_PACK":
        return where
    return f"{where}; across nodes, {TP_ACROSS_NODES}"


def _experts(plan: Plan) -> str:
    """A MoE model's experts, its active parameters, and how the ranks hold the experts."""
    m, tp = plan.model, plan.tensor_parallel_size
    text = (f"{m.num_experts} per MoE layer ({len(m.sparse_layers)} of {m.num_layers}), top "
            f"{m.experts_per_token} per token: {_count(plan.active_params)} of "
            f"{_count(plan.model_params)} parameters active")
    if tp == 1:
        return text
    if plan.expert_parallel:
        return (f"{text}; expert parallel: {m.num_experts // tp} whole experts per rank (with "
                "tensor parallelism, 1/tp of each: the same bytes)")
    other = (f"with enable_expert_parallel, {m.num_experts // tp} whole experts: the same bytes"
             if m.num_experts % tp == 0 else
             f"enable_expert_parallel would need num_experts divisible by {tp}")
    return f"{text}; tensor parallel: 1/{tp} of every expert's features per rank ({other})"


def _weight_scheme(scheme: WeightScheme, plan: Plan) -> str:
    """How the linear layers' weights are held, and the bytes one takes."""
    if scheme.kind == "int":
        stored = (f"{scheme.bits}-bit int "
                  + (f"in groups of {scheme.group}" if scheme.group else "per channel")
                  + (", symmetric" if scheme.symmetric else ", with zero points"))
    else:
        stored = "float8_e4m3" + (f" in [{scheme.block[0]}, {scheme.block[1]}] blocks"
                                  if scheme.block else "")
        stored += (f", {scheme.activations} FP8 activations" if scheme.activations
                   else ", weight-only")
    per_weight = plan.model.linear_weight_bytes(DTYPE_BYTES[plan.dtype])
    return (f"{scheme.name} ({scheme.method}: {stored}): {per_weight:.3f} bytes a linear "
            f"weight, scales included; embeddings, norms and LM head in {plan.dtype}")


def format_plan(plan: Plan) -> str:
    """A human-readable report of `plan`, per GPU first, then per replica."""
    m, tp = plan.model, plan.tensor_parallel_size
    unit = "GPU" if plan.device == "cuda" else "CPU worker"
    ranks = f"{tp} {unit}{'s' if tp > 1 else ''}"
    rows = [
        ("model", m.source),
        ("", f"{m.model_type}, {_count(plan.model_params)} parameters, "
             f"{m.num_layers} layers, hidden "
             f"{m.hidden_size}, {m.num_heads} heads / {m.num_kv_heads} KV heads x {m.head_dim}, "
             f"vocab {m.vocab_size}, {plan.dtype}"),
        *([("quantization", _weight_scheme(m.weight_scheme, plan))] if m.weight_scheme else []),
        *([("experts", _experts(plan))] if m.is_moe else []),
        ("replica", f"{ranks} (tensor_parallel_size={tp}), max_model_len {plan.max_model_len}, "
                    f"block_size {plan.block_size}"),
        *([("placement", _placement(plan))] if tp > 1 else []),
        ("weights, all ranks", format_bytes(plan.total_weight_bytes)),
        ("per rank", ""),
        ("  parameters", f"{plan.params_per_rank:,}"),
        ("  weights", format_bytes(plan.weight_bytes_per_rank) + (
            f" ({plan.linear_params_per_rank:,} linear weights {m.weight_scheme.name}, the "
            f"rest {plan.dtype})" if m.weight_scheme else "")),
    ]
    if plan.lora_slots:
        rows.append(("  LoRA slots", f"{format_bytes(plan.lora_bytes_per_rank)} ({plan.lora_slots} "
                                     "adapters at max_lora_rank)"))
    if plan.gpu_memory_bytes is not None and plan.headroom_bytes is not None:
        rows += [
            ("  GPU memory", f"{format_bytes(plan.gpu_memory_bytes)} x gpu_memory_utilization "
                             f"{plan.gpu_memory_utilization}"),
            ("  activation headroom", f"{format_bytes(plan.headroom_bytes)} (1 GiB runtime, "
                                      f"a step of {plan.max_num_batched_tokens} tokens, logits of "
                                      f"{plan.max_num_seqs} sequences)"),
            ("  KV budget", format_bytes(plan.kv_budget_bytes)),
        ]
    else:
        rows.append(("  KV budget",
                     f"{format_bytes(plan.kv_budget_bytes)} (engine.kv_cache_memory_gb)"))
    rows += [
        ("  KV per token", f"{plan.kv_bytes_per_token:,} bytes ({plan.kv_cache_dtype})"),
        ("  KV blocks", f"{plan.num_blocks:,} x {plan.block_size} tokens = "
                        f"{plan.num_cache_tokens:,} tokens"),
        ("sequences", f"paged, at mean length {plan.mean_seq_len}: {plan.seqs_at_mean_len:,}"),
        ("", f"pre-allocating max_model_len {plan.max_model_len}: "
             f"{plan.seqs_at_max_model_len:,}"),
        ("", f"the scheduler runs at most max_num_seqs={plan.max_num_seqs} at once"),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}".rstrip() for label, value in rows)
