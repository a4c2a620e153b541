"""The rules a model and a machine must meet, written once for every reader.

The engine (resolving a model, sizing its KV pool), the simulated GPU and
the planner all ask the same questions of a model's shape: can it be
sharded over this many ranks, how long a context may it serve, in which
dtype does it run and in which does its KV cache, what KV budget does a
GPU leave (and a CPU take), and does that pool hold one whole sequence.
Each answer, and the error that refuses a config, is written here; the
shape's own figures (head_dim, biases, KV and weight bytes) are ModelShape's
(shape.py). Pure arithmetic: no torch.
"""

from __future__ import annotations

from pagedserve.config import EngineConfig
from pagedserve.math_utils import cdiv
from pagedserve.model.shape import DTYPE_BYTES, GIB, ModelShape


def check_tensor_parallel(shape: ModelShape, tp: int, expert_parallel: bool = False) -> None:
    """Heads, MLP features and experts are split evenly over ranks, or the model cannot be
    sharded: a MoE layer's experts by their features, or under expert parallelism whole."""
    if expert_parallel and not shape.is_moe:
        raise ValueError(f"parallel.enable_expert_parallel is for a mixture-of-experts model; "
                         f"{shape.source} ({shape.model_type}) has no experts")
    splits = [("num_attention_heads", shape.num_heads),
              ("num_key_value_heads", shape.num_kv_heads)]
    if len(shape.sparse_layers) < shape.num_layers:  # dense MLP layers
        splits.append(("intermediate_size", shape.intermediate_size))
    if shape.is_moe:
        splits.append(("num_experts", shape.num_experts) if expert_parallel else
                      ("experts' intermediate_size", shape.expert_intermediate_size))
    for field, value in splits:
        if value % tp:
            raise ValueError(f"parallel.tensor_parallel_size={tp} does not divide the model's "
                             f"{field}={value} ({shape.source}): choose a tensor_parallel_size "
                             "that does; every rank needs an equal share")


def max_model_len(requested: int | None, shape: ModelShape) -> int:
    """model.max_model_len, or the model's context limit when unset; never past it."""
    if requested is None:
        return shape.context_limit
    if requested > shape.context_limit:
        raise ValueError(f"model.max_model_len={requested} exceeds the model's limit of "
                         f"{shape.context_limit} tokens (max_position_embeddings)")
    return requested


def served_dtype(requested: str, saved: str | None, device_type: str) -> str:
    """model.dtype as served: "auto" is the dtype the checkpoint saved (float32 when it
    saved none of ours), except that a saved float16 runs in bfloat16 on a CPU, which
    has no fast float16 matmul; bfloat16 keeps float16's size and has more range.

    An asked-for dtype is taken as asked; the engine still runs float16 in bfloat16
    on a CPU without native float16 matmuls (engine/executors.py, choose_dtype).
    """
    if requested != "auto":
        return requested
    dtype = saved if saved in DTYPE_BYTES else "float32"
    if dtype == "float16" and device_type == "cpu":
        return "bfloat16"
    return dtype


def kv_dtype_bytes(engine: EngineConfig, model_dtype_bytes: int) -> int:
    """Bytes of one cached K or V value: engine.kv_cache_dtype's fp8 variants (fp8,
    fp8_e4m3, fp8_e5m2) one, "auto" the model dtype's. Half of bfloat16's: twice the
    blocks in the same memory, and half the KV bytes a decode step reads."""
    return model_dtype_bytes if engine.kv_cache_dtype == "auto" else 1


def gpu_kv_budget(gpu_memory: int, utilization: float, weight_bytes: int, headroom: int,
                  tp: int, gpu: str = "GPU") -> int:
    """The bytes the KV pool of one GPU gets: gpu_memory_utilization of its memory, less
    the rank's weights (and adapter slots) and the activation headroom of the largest
    step (shape.headroom_bytes). Refused, saying how much is missing, when nothing is left.
    """
    usable = int(gpu_memory * utilization)
    budget = usable - weight_bytes - headroom
    if budget <= 0:
        raise ValueError(
            f"the model does not fit: per {gpu}, weights ({format_bytes(weight_bytes)}) + "
            f"activation headroom ({format_bytes(headroom)}) exceed "
            f"engine.gpu_memory_utilization={utilization} x {format_bytes(gpu_memory)} "
            f"({format_bytes(usable)}) by {format_bytes(-budget)}: raise "
            f"parallel.tensor_parallel_size={tp} or the GPU memory, or lower "
            "engine.max_num_batched_tokens")
    return budget


def cpu_kv_budget(engine: EngineConfig) -> int:
    """The bytes of a CPU's KV pool: engine.kv_cache_memory_gb, as asked (a CPU's memory
    is not profiled; adapter slots come on top)."""
    return int(engine.kv_cache_memory_gb * GIB)


def check_pool_holds_a_sequence(num_blocks: int, engine: EngineConfig, max_model_len: int,
                                on_gpu: bool, block_bytes: int | None = None) -> None:
    """A pool smaller than one sequence of max_model_len could never finish a long
    request: refused, naming what sized the pool (`on_gpu`: the GPU's budget, else
    engine.kv_cache_memory_gb)."""
    per_seq = cdiv(max_model_len, engine.block_size)
    if num_blocks >= per_seq:
        return
    source = ("engine.num_gpu_blocks" if engine.num_gpu_blocks else
              "engine.gpu_memory_utilization" if on_gpu else "engine.kv_cache_memory_gb")
    block = "" if block_bytes is None else f" (one block takes {block_bytes} bytes)"
    raise ValueError(f"the KV pool has {num_blocks} blocks of {engine.block_size} tokens, fewer "
                     f"than the {per_seq} one sequence of model.max_model_len={max_model_len} "
                     f"needs: raise {source}{block} or lower model.max_model_len")


def format_bytes(num_bytes: int) -> str:
    """MiB below a GiB, GiB above: how the rules' errors and the plan write sizes."""
    if num_bytes < GIB:
        return f"{num_bytes / 2**20:.1f} MiB"
    return f"{num_bytes / GIB:.2f} GiB"
