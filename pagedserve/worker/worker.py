"""One worker: a device, the model's weights, its KV pool and a ModelRunner.

The pool is one tensor, so a block can be copied in every layer at once:

    kv_pool: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    kv_caches[layer] = (kv_pool[layer, 0], kv_pool[layer, 1])   keys, values

Both hold engine.kv_cache_dtype: the model dtype, or fp8 at one byte a value
(kernels/kv_quant.py), which fits twice the blocks of bfloat16 in the same memory.
A CPU pool of the same layout (`cpu_pool`, pinned on CUDA) holds the blocks of
swapped-out requests. With tensor parallelism each rank's pools hold only its
own KV heads; block ids are the same on every rank, so one block manager
serves them all.

On CUDA, unless `enforce_eager`, decode steps replay CUDA graphs captured once
the pool exists (cuda_graph.py). The graphs' memory is measured while
profiling, by capturing them once over a scratch pool, and left out of the
KV pool's budget.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from pagedserve.config import EngineConfig
from pagedserve.kernels.kv_quant import kv_cache_dtype
from pagedserve.kernels.swap import swap_blocks
from pagedserve.math_utils import cdiv
from pagedserve.model.info import ModelInfo
from pagedserve.model.rules import cpu_kv_budget
from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.step import ScheduledSequence, StepInput, StepOutput
from pagedserve.worker.cuda_graph import DecodeGraphs
from pagedserve.worker.distributed import TPGroup
from pagedserve.worker.draft import Drafter
from pagedserve.worker.eagle_draft import EagleDrafter
from pagedserve.worker.layers.attention import KVCache, select_attention_backend
from pagedserve.worker.layers.linear import weight_bytes
from pagedserve.worker.model_runner import ModelRunner
from pagedserve.worker.models import build_model
from pagedserve.worker.models.eagle import HEADS, aux_layers, build_head
from pagedserve.worker.simulated import SimulatedWorker
from pagedserve.worker.worker_lora import WorkerLoRA

logger = logging.getLogger(__name__)


def kv_block_shape(info: ModelInfo, block_size: int, tp_size: int) -> tuple[int, int, int]:
    """[block_size, kv heads of one rank, head_dim] of one block of one layer's keys."""
    return block_size, info.shape.num_kv_heads // tp_size, info.shape.head_dim


def kv_block_bytes(info: ModelInfo, engine: EngineConfig, tp_size: int) -> int:
    """Bytes of one block on one rank, across all layers, keys and values, in the KV
    cache's dtype; with a draft's too (split over the ranks like the target)."""
    itemsize = kv_cache_dtype(engine.kv_cache_dtype, info.dtype).itemsize
    own = engine.block_size * info.shape.kv_bytes_per_token(tp_size, itemsize)
    return own if info.draft is None else own + kv_block_bytes(info.draft, engine, tp_size)


class Worker:
    def __init__(self, info: ModelInfo, engine: EngineConfig, load_format: str,
                 tp: TPGroup = TPGroup(), checkpoint: dict[str, torch.Tensor] | None = None
                 ) -> None:
        self.info = info
        self.engine = engine
        self.tp = tp
        keep_quantized = info.quantization in ("auto", "fp8")
        self.model = build_model(info.hf_config, info.model_dir, max_position=info.max_model_len,
                                 dtype=info.dtype, device=info.device, load_format=load_format,
                                 tp=tp, gguf_file=info.gguf_file, checkpoint=checkpoint,
                                 expert_parallel=info.expert_parallel,
                                 keep_quantized=keep_quantized,
                                 weight_scheme=info.weight_scheme)
        self.weight_bytes = weight_bytes(self.model)
        self.kv_dtype = kv_cache_dtype(engine.kv_cache_dtype, info.dtype)
        self.attention = select_attention_backend(engine.attention_backend, info.device,
                                                  self.kv_block_shape[1])
        self.runner = ModelRunner(self.model, engine.block_size, self.attention, info.device,
                                  engine.seed)
        self.drafter: Drafter | EagleDrafter | None = None
        if info.draft is not None:  # split over the ranks like the target
            self.drafter = self._build_drafter(info.draft, load_format)
            self.weight_bytes += weight_bytes(self.drafter.runner.model)
        # Adapter slots take their memory before the KV pool is sized from what is left.
        self.lora = None if info.lora is None else WorkerLoRA(
            self.model, info.lora, info.hf_config, info.dtype, info.device)
        self.runner.lora = self.lora
        self.kv_pool: torch.Tensor | None = None
        self.cpu_pool: torch.Tensor | None = None
        self.kv_caches: list[KVCache] = []
        # The draft model's pools, of its own shape, under the same block ids.
        self.draft_pool: torch.Tensor | None = None
        self.draft_cpu_pool: torch.Tensor | None = None
        self.draft_caches: list[KVCache] = []
        self.graph_memory_bytes = 0  # measured while profiling
        # The tokens the last step sampled: the next step's tokens in flight.
        self.async_scheduling = engine.uses_async_scheduling(info.device.type)
        self._last_tokens: dict[int, int] = {}
        # Decode graphs are captured without adapters: with LoRA every step runs eagerly.
        self.uses_graphs = (info.device.type == "cuda" and not engine.enforce_eager
                            and self.lora is None)
        if self.uses_graphs and not self.attention.supports_graphs:
            logger.warning("attention_backend=%r runs eagerly: CUDA graphs need 'triton'",
                           self.attention.name)
            self.uses_graphs = False
        if self.uses_graphs and not all(getattr(module, "capturable", True)
                                        for module in self.model.modules()):
            logger.warning("MoE experts kept quantized in unlike formats run one by one, "
                           "eagerly: decode steps are not captured in CUDA graphs")
            self.uses_graphs = False

    def _build_drafter(self, draft: ModelInfo, load_format: str) -> Drafter | EagleDrafter:
        """This rank's shard of the draft model or EAGLE head, with a runner of its own."""
        attention = select_attention_backend(self.engine.attention_backend, draft.device,
                                             draft.shape.num_kv_heads // self.tp.size)
        if draft.draft_method in HEADS:
            head = build_head(draft.draft_method, draft.hf_config, draft.model_dir, self.model,
                              max_position=self.info.max_model_len, dtype=draft.dtype,
                              device=draft.device, load_format=load_format, tp=self.tp)
            if draft.draft_method == "eagle3":
                self.model.aux_layers = aux_layers(draft.hf_config, self.info.shape.num_layers)
            return EagleDrafter(head, ModelRunner(head, self.engine.block_size, attention,
                                                  draft.device, self.engine.seed), self.runner,
                                self.tp)
        model = build_model(draft.hf_config, draft.model_dir, max_position=self.info.max_model_len,
                            dtype=draft.dtype, device=draft.device, load_format=load_format,
                            tp=self.tp, gguf_file=draft.gguf_file,
                            keep_quantized=draft.quantization in ("auto", "fp8"),
                            weight_scheme=draft.weight_scheme)
        return Drafter(ModelRunner(model, self.engine.block_size, attention, draft.device,
                                   self.engine.seed), self.tp)

    @property
    def kv_block_shape(self) -> tuple[int, int, int]:
        return kv_block_shape(self.info, self.engine.block_size, self.tp.size)

    @property
    def block_bytes(self) -> int:
        """A block's bytes on this rank: the target's KV, and a draft's."""
        return kv_block_bytes(self.info, self.engine, self.tp.size)

    def num_available_blocks(self, max_num_batched_tokens: int) -> int:
        """How many KV blocks fit the memory budget of this device."""
        if self.info.device.type != "cuda":
            return cpu_kv_budget(self.engine) // self.block_bytes
        return self._profile_cuda(max_num_batched_tokens)

    def _profile_cuda(self, num_tokens: int) -> int:
        """Run the largest step once; what it peaks at is not available to the pool."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        num_blocks = cdiv(num_tokens, self.engine.block_size)
        scratch = self._allocate(num_blocks)
        dummy = ScheduledSequence(seq_id=0, token_ids=[0] * num_tokens, start_pos=0,
                                  block_table=list(range(num_blocks)), do_sample=True,
                                  sampling_params=SamplingParams(temperature=0.0))
        self.runner.execute(StepInput(seqs=[dummy]), _layer_caches(scratch))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        if self.uses_graphs:
            graphs = self._decode_graphs(_layer_caches(scratch))
            graphs.capture()
            self.graph_memory_bytes = graphs.memory_bytes
            del graphs
        del scratch
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        others = total - free - torch.cuda.memory_reserved()  # other processes, CUDA context
        budget = (total * self.engine.gpu_memory_utilization - peak - others
                  - self.graph_memory_bytes)
        logger.info("KV pool budget %.2f GiB (peak step %.2f GiB, CUDA graphs %.2f GiB, "
                    "total %.2f GiB)", budget / 2**30, peak / 2**30,
                    self.graph_memory_bytes / 2**30, total / 2**30)
        return max(0, int(budget) // self.block_bytes)

    def _decode_graphs(self, kv_caches: list[KVCache]) -> DecodeGraphs:
        return DecodeGraphs(self.model, self.attention, kv_caches,
                            block_size=self.engine.block_size,
                            max_model_len=self.info.max_model_len,
                            max_num_seqs=self.engine.max_num_seqs, device=self.info.device)

    def init_kv_cache(self, num_blocks: int, num_cpu_blocks: int = 0) -> None:
        self.kv_pool = self._allocate(num_blocks)
        self.kv_caches = _layer_caches(self.kv_pool)
        if self.uses_graphs:
            self.runner.graphs = self._decode_graphs(self.kv_caches)
            self.runner.graphs.capture()
        if num_cpu_blocks:
            # Left uninitialised: pages the OS has not handed out cost nothing until a swap.
            self.cpu_pool = torch.empty(self._pool_shape(num_cpu_blocks), dtype=self.kv_dtype,
                                        pin_memory=self.info.device.type == "cuda")
        if self.drafter is not None:
            self.draft_pool = self._allocate(num_blocks, self.info.draft)
            self.draft_caches = _layer_caches(self.draft_pool)
            if num_cpu_blocks:
                self.draft_cpu_pool = torch.empty(
                    self._pool_shape(num_cpu_blocks, self.info.draft), dtype=self.kv_dtype,
                    pin_memory=self.info.device.type == "cuda")

    def _allocate(self, num_blocks: int, info: ModelInfo | None = None) -> torch.Tensor:
        return torch.zeros(self._pool_shape(num_blocks, info), dtype=self.kv_dtype,
                           device=self.info.device)

    def _pool_shape(self, num_blocks: int, info: ModelInfo | None = None) -> tuple[int, ...]:
        """[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] of this rank's
        model, or of `info`'s (the draft model, whole on its rank)."""
        if info is None:
            return (self.info.shape.num_layers, 2, num_blocks, *self.kv_block_shape)
        return (info.shape.num_layers, 2, num_blocks,
                *kv_block_shape(info, self.engine.block_size, self.tp.size))

    def execute(self, step: StepInput) -> StepOutput | None:
        """Run one step; rank 0 returns the sampled tokens, other ranks None.

        A sequence whose `last_token_in_flight` is set (scheduled while the step
        before ran) takes the token this worker sampled for it in that step.
        """
        step = _with_tokens_in_flight(step, self._last_tokens)
        # Block moves come first: out before in (a swapped-in block may reuse a
        # swapped-out one), copies before anything writes into them.
        pools = [(self.kv_pool, self.cpu_pool)]
        if self.drafter is not None:
            pools.append((self.draft_pool, self.draft_cpu_pool))
        for device_pool, host_pool in pools:
            if step.blocks_to_swap_out:
                swap_blocks(device_pool, host_pool, torch.tensor(step.blocks_to_swap_out))
            if step.blocks_to_swap_in:
                swap_blocks(host_pool, device_pool, torch.tensor(step.blocks_to_swap_in))
            if step.blocks_to_copy:
                mapping = torch.tensor(step.blocks_to_copy, dtype=torch.int64,
                                       device=self.info.device)
                self.attention.copy_blocks(device_pool, mapping)
        if step.lora_loads or step.lora_unloads:
            self.lora.apply(step.lora_loads, step.lora_unloads)
        output = self.runner.execute(step, self.kv_caches)
        if self.drafter is not None and step.seqs:
            output = self.drafter.propose(step, output, self.draft_caches)
        if self.async_scheduling:
            self._last_tokens = self._sampled_tokens(step, output)
        return output

    def _sampled_tokens(self, step: StepInput, output: StepOutput | None) -> dict[int, int]:
        """Each sampling sequence's token, on every rank: rank 0 broadcasts what it sampled."""
        seq_ids = [seq.seq_id for seq in step.seqs if seq.do_sample]
        if not seq_ids:
            return {}
        tokens = {}
        if output is not None:
            for sample in output.samples:
                tokens.setdefault(sample.seq_id, sample.token_id)
        if self.tp.size > 1:
            # Rank 0 sampled a token for every sampling sequence; the others receive them.
            if output is not None:
                values = torch.tensor([tokens[seq_id] for seq_id in seq_ids],
                                      dtype=torch.int64, device=self.info.device)
            else:
                values = torch.empty(len(seq_ids), dtype=torch.int64, device=self.info.device)
            self.tp.broadcast(values)
            tokens = dict(zip(seq_ids, values.tolist(), strict=True))
        return tokens


def _with_tokens_in_flight(step: StepInput, tokens: dict[int, int]) -> StepInput:
    """The step with each token in flight appended to its sequence's `token_ids`:
    `tokens` holds what the step before sampled, by sequence id."""
    if not any(seq.last_token_in_flight for seq in step.seqs):
        return step
    seqs = [dataclasses.replace(seq, token_ids=[*seq.token_ids, tokens[seq.seq_id]],
                                last_token_in_flight=False)
            if seq.last_token_in_flight else seq for seq in step.seqs]
    return dataclasses.replace(step, seqs=seqs)


def make_worker(info: ModelInfo, engine: EngineConfig, load_format: str,
                tp: TPGroup = TPGroup(), checkpoint: dict[str, torch.Tensor] | None = None
                ) -> Worker | SimulatedWorker:
    """A worker on the device, or on the simulated accelerator the config names."""
    if engine.simulator is not None:
        return SimulatedWorker(info, engine, tp.rank, tp.size)
    return Worker(info, engine, load_format, tp, checkpoint)


def _layer_caches(kv_pool: torch.Tensor) -> list[KVCache]:
    return [(layer[0], layer[1]) for layer in kv_pool]
