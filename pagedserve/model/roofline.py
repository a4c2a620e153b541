"""How long a step takes on a GPU: a roofline model, and the GPUs it knows.

A step reads every weight of its rank once and the KV of every scheduled
context, and does 2 FLOPs per weight per token plus attention. It takes
whichever is longer:

    memory  = (weights + KV read + KV written) / (copy bandwidth x memory efficiency)
    compute = FLOPs / (dense bf16 peak x tensor efficiency)
    step    = max(memory, compute) + all-reduces (tensor parallel only)

Weights are read at the size they are held in (shape.weight_bytes_per_rank: a
quantized checkpoint's linear layers at its scheme's bytes a weight), and KV at
the KV cache's dtype (one byte a value for kv_cache_dtype fp8), so a
memory-bound decode step of W4A16 or FP8 weights reads about a quarter or a
half of bf16's linear-layer bytes. Where the linear layers multiply FP8 weights by FP8
activations (an FP8 checkpoint with activation scales, or model.quantization
"fp8") on a GPU with FP8 tensor cores, their FLOPs run at the dense FP8 peak
(twice bf16's on Hopper); attention and the LM head stay in bf16. W4A16 and
W8A16 dequantize their weights in registers and multiply in bf16: only their
bytes change.

Decode steps are memory-bound and prefill steps compute-bound, so a mixed step
takes the larger of the two. With tensor parallelism each layer all-reduces
its attention and MLP outputs over the link: a ring moves 2 (tp - 1) / tp of
the bytes, plus a fixed latency per all-reduce.

Llama-3-8B in bf16 at batch 256, 1,024-token contexts, on an H200:
16.06 GB of weights + 256 x 1,024 x 128 KiB of KV = 50.4 GB, / 4.18 TB/s = 12.1 ms
at the copy's rate; pagedserve's decode steps sustained 0.57 of that rate on an
H200 (BENCHMARKS.md, "GPU check"), so 21 ms.

A layer with a sliding window W reads, and attends to, at most the last W
positions of each context: its KV read and attention FLOPs are those of
min(context, W) positions.

A mixture-of-experts layer's step reads only the experts its tokens are routed
to: with each token choosing k of E experts, a batch of T tokens touches the
union of their choices, E (1 - (1 - k/E)^T) experts when routing spreads evenly,
so one decode token reads k experts and a large batch all of them. Its FLOPs
are those of the k experts each token runs. Under tensor or expert parallelism
a rank holds 1/tp of the expert weights either way, and reads that share of
the touched experts.

Pure arithmetic, no torch: the planner and the simulated accelerator
(simulated.py) both use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.math_utils import cdiv
from pagedserve.model.shape import (
    ModelShape,
    linear_params_per_rank,
    params_per_rank,
    weight_bytes_per_rank,
)

MIB = 2**20


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int  # what the driver reports (nvidia-smi's total)
    copy_bandwidth: float  # bytes/s, a measured device-to-device copy, read + write
    dense_bf16_flops: float  # data-sheet peak, dense (no sparsity)
    tensor_efficiency: float  # the share of that peak large GEMMs sustain
    memory_efficiency: float  # the share of copy_bandwidth a memory-bound decode step sustains
    link_bandwidth: float  # bytes/s of all-reduce bus bandwidth per GPU (NVLink, NCCL)
    allreduce_latency_s: float  # per all-reduce, however small
    sources: str
    # Data-sheet peak of FP8 x FP8 tensor-core GEMMs, dense; None: no FP8 tensor cores
    # (an FP8 checkpoint then runs as weight-only, its GEMMs in bf16).
    dense_fp8_flops: float | None = None

    @property
    def sustained_flops(self) -> float:
        return self.dense_bf16_flops * self.tensor_efficiency

    @property
    def sustained_fp8_flops(self) -> float | None:
        """FP8 GEMMs at the share of their peak that bf16's sustain (assumed: not measured)."""
        if self.dense_fp8_flops is None:
            return None
        return self.dense_fp8_flops * self.tensor_efficiency

    @property
    def sustained_bandwidth(self) -> float:
        return self.copy_bandwidth * self.memory_efficiency


# FP8: the data sheets give FP8 tensor-core peaks with 2:4 sparsity (3,958 TFLOPS on H100
# SXM and H200); dense is half, 1,979: twice dense bf16's 989. The H200 has the H100's
# compute (NVIDIA H100 Tensor Core GPU and H200 Tensor Core GPU data sheets).
GPUS = {gpu.name: gpu for gpu in (
    GPU("h100-sxm", memory_bytes=81559 * MIB, copy_bandwidth=3.0e12, dense_bf16_flops=989e12,
        dense_fp8_flops=1979e12,
        tensor_efficiency=0.75, memory_efficiency=0.57, link_bandwidth=360e9,
        allreduce_latency_s=10e-6,
        sources="NVIDIA H100 data sheet (80 GB HBM3, 3.35 TB/s, 989 TFLOPS dense bf16, "
                "1,979 dense FP8, NVLink 900 GB/s); copy bandwidth about 3.0 TB/s measured; "
                "NCCL all-reduce bus bandwidth about 360 GB/s on 4-8 GPUs (nccl-tests); "
                "81559 MiB as nvidia-smi reports; efficiencies as the H200's, latency assumed"),
    GPU("h200", memory_bytes=143771 * MIB, copy_bandwidth=4.18e12, dense_bf16_flops=989e12,
        dense_fp8_flops=1979e12,
        tensor_efficiency=0.78, memory_efficiency=0.57, link_bandwidth=360e9,
        allreduce_latency_s=10e-6,
        sources="NVIDIA H200 data sheet (141 GB HBM3e, 4.8 TB/s, 989 TFLOPS dense bf16, "
                "1,979 dense FP8, NVLink 900 GB/s); measured on an H200 here: copy "
                "4.13-4.23 TB/s (median 4.18 of five runs, 2026-12-04), 8192^3 bf16 matmul "
                "769-798 TFLOP/s (0.78 of peak), 143771 MiB in nvidia-smi; Llama-3-8B bf16 "
                "decode steps took 1.67-1.93x (median 1.77x) the copy-rate floor at batch 1, "
                "64 and 256 (gpu_e2e.py), so 0.57 of it; link as the H100's; FP8 GEMMs' "
                "efficiency and latency assumed"),
    GPU("a100-80gb", memory_bytes=81920 * MIB, copy_bandwidth=1.7e12, dense_bf16_flops=312e12,
        tensor_efficiency=0.75, memory_efficiency=0.57, link_bandwidth=230e9,
        allreduce_latency_s=12e-6,
        sources="NVIDIA A100 data sheet (80 GB HBM2e, 2.04 TB/s, 312 TFLOPS dense bf16, "
                "no FP8 tensor cores, NVLink 600 GB/s); copy bandwidth about 1.7 TB/s "
                "measured (about 85% of peak, as on Hopper); NCCL bus bandwidth about "
                "230 GB/s; memory efficiency as the H200's; tensor efficiency and latency "
                "assumed"),
)}


@dataclass(frozen=True)
class StepShape:
    """One scheduled sequence as the model sees it: new tokens, and the context they
    attend to once written (the new tokens included)."""

    num_tokens: int
    context_len: int
    samples: int  # rows through the LM head: its last, or 1 + k when it speculated


class Roofline:
    """Step times of one model shape on one GPU, per tensor-parallel rank."""

    def __init__(self, gpu: GPU, shape: ModelShape, tp: int, dtype_bytes: int,
                 kv_dtype_bytes: int | None = None) -> None:
        """`dtype_bytes`: the model dtype's (activations, unquantized weights);
        `kv_dtype_bytes`: the KV cache's (rules.kv_dtype_bytes), the model's when None.
        Linear weights are held as shape.weight_scheme says."""
        self.gpu, self.shape, self.tp = gpu, shape, tp
        self.dtype_bytes = dtype_bytes
        self.weight_bytes = weight_bytes_per_rank(shape, tp, dtype_bytes)
        self.kv_bytes_per_token = shape.kv_bytes_per_token(
            tp, dtype_bytes if kv_dtype_bytes is None else kv_dtype_bytes)
        self.linear_weight_bytes = shape.linear_weight_bytes(dtype_bytes)
        self.linear_params = linear_params_per_rank(shape, tp)
        scheme = shape.weight_scheme
        # FP8 weights times FP8 activations run on FP8 tensor cores where the GPU has them.
        fp8 = scheme is not None and scheme.kind == "float" and scheme.activations is not None
        fp8_rate = gpu.sustained_fp8_flops if fp8 else None
        self.linear_flops_rate = gpu.sustained_flops if fp8_rate is None else fp8_rate
        vocab_rows = cdiv(shape.vocab_size, tp)
        # Weights every token multiplies (the embedding is a lookup, the LM head
        # runs on sampled rows only).
        self.lm_head_params = vocab_rows * shape.hidden_size
        embedding = vocab_rows * shape.hidden_size
        self.body_params = params_per_rank(shape, tp) - embedding - (
            0 if shape.tie_word_embeddings else self.lm_head_params)
        self.attention_width = shape.num_heads // tp * shape.head_dim
        # This rank's expert weights (every MoE layer's), and those one token runs.
        per_expert = 3 * shape.hidden_size * shape.expert_intermediate_size / tp
        sparse = len(shape.sparse_layers)
        self.expert_params = sparse * shape.num_experts * per_expert
        self.active_expert_params = sparse * shape.experts_per_token * per_expert
        # Layers of full attention, and the windows of the others.
        windows = shape.layer_windows or (None,) * shape.num_layers
        self.full_layers = sum(window is None for window in windows)
        self.windows = [window for window in windows if window is not None]

    def _context_layers(self, context: int) -> int:
        """Positions of one context that a step reads, summed over the layers."""
        return self.full_layers * context + sum(min(context, w) for w in self.windows)

    def touched_experts(self, tokens: int) -> float:
        """The share of a MoE layer's experts a step of `tokens` tokens reads: the union of
        their top-k choices, routing spread evenly (1 for a dense model)."""
        if not self.shape.is_moe:
            return 1.0
        return 1.0 - (1.0 - self.shape.experts_per_token / self.shape.num_experts) ** tokens

    def step_time(self, seqs: list[StepShape]) -> float:
        """Seconds one step takes on the GPU (every rank alike)."""
        return self._time([(seq, 1) for seq in seqs])

    def decode_time(self, sequences: int, drafts: int, context: int) -> float:
        """A decode step of `sequences` sequences at a mean `context`, with `drafts`
        speculated tokens spread among them (each computed and read by the LM head)."""
        each, extra = divmod(drafts, sequences)
        return self._time([(StepShape(2 + each, context + 1 + each, 2 + each), extra),
                           (StepShape(1 + each, context + each, 1 + each), sequences - extra)])

    def _time(self, groups: list[tuple[StepShape, int]]) -> float:
        """step_time of `count` sequences of each shape."""
        groups = [(seq, count) for seq, count in groups if count]
        if not groups:
            return 0.0
        tokens = sum(seq.num_tokens * count for seq, count in groups)
        sampled = sum(seq.samples * count for seq, count in groups)
        per_layer = self.kv_bytes_per_token / self.shape.num_layers
        kv_read = sum(self._context_layers(seq.context_len) * count
                      for seq, count in groups) * per_layer
        kv_written = tokens * self.kv_bytes_per_token
        untouched = (self.expert_params * (1.0 - self.touched_experts(tokens))
                     * self.linear_weight_bytes)
        weights = self.weight_bytes - untouched
        memory = (weights + kv_read + kv_written) / self.gpu.sustained_bandwidth
        # Each new token attends to the context before it: q x (c - q) + q (q + 1) / 2 pairs,
        # in a layer of full attention; within its window in the others.
        layer_pairs = sum((self.full_layers * _pairs(seq.num_tokens, seq.context_len)
                           + sum(_pairs(seq.num_tokens, seq.context_len, w)
                                 for w in self.windows)) * count
                          for seq, count in groups)
        unrouted = self.expert_params - self.active_expert_params
        # The linear layers' FLOPs (at FP8's rate for FP8 x FP8), and the rest: norms,
        # biases, the router, the LM head and attention.
        linear = 2 * (self.linear_params - unrouted) * tokens
        other = (2 * (self.body_params - self.linear_params) * tokens
                 + 2 * self.lm_head_params * sampled + 4 * self.attention_width * layer_pairs)
        compute = linear / self.linear_flops_rate + other / self.gpu.sustained_flops
        return max(memory, compute) + self.allreduce_time(tokens)

    def allreduce_time(self, tokens: int) -> float:
        """Two all-reduces per layer (attention out, MLP out) of [tokens, hidden]."""
        if self.tp == 1:
            return 0.0
        size = tokens * self.shape.hidden_size * self.dtype_bytes
        ring = 2 * (self.tp - 1) / self.tp * size / self.gpu.link_bandwidth
        return 2 * self.shape.num_layers * (ring + self.gpu.allreduce_latency_s)


def _pairs(num_tokens: int, context: int, window: int | None = None) -> int:
    """(query, key) pairs of `num_tokens` new tokens at the end of `context` positions,
    each seeing the positions before it (its last `window` of them)."""
    if window is None or window >= context:
        return num_tokens * (context - num_tokens) + num_tokens * (num_tokens + 1) // 2
    first = context - num_tokens  # position of the first new token
    # Token at position p sees min(p + 1, window) positions.
    full_from = max(first, window - 1)  # from here on, every token sees `window`
    low, high = first + 1, min(full_from, context)  # the ramp: positions + 1 in low..high
    ramp = (low + high) * (high - low + 1) // 2 if high >= low else 0
    return ramp + (context - max(full_from, first)) * window
