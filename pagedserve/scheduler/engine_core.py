"""EngineCore: schedule -> execute -> update, one step at a time.

The offline `LLM` and the serving replica both drive this loop; neither knows
about blocks or workers. Requests come in as token ids; text appears only on
the way out (incremental detokenization, stop strings).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pagedserve.config import EngineConfig, ModelConfig
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.block_manager import BlockManager, cdiv
from pagedserve.scheduler.detokenizer import Detokenizer
from pagedserve.scheduler.scheduler import Scheduler, SchedulerConfig
from pagedserve.scheduler.sequence import FinishReason, Sequence, SequenceGroup
from pagedserve.worker.executor import Executor, LocalExecutor
from pagedserve.worker.model_info import ModelInfo, resolve

logger = logging.getLogger(__name__)


@dataclass
class _Usage:
    """KV slot usage summed over steps, for the mean the benchmark reports."""

    steps: int = 0
    slot_utilization: float = 0.0
    peak_allocated_blocks: int = 0


class EngineCore:
    def __init__(self, info: ModelInfo, scheduler: Scheduler, executor: Executor,
                 tokenizer: PreTrainedTokenizerBase | None) -> None:
        self.info = info
        self.scheduler = scheduler
        self.block_manager = scheduler.block_manager
        self.executor = executor
        self.tokenizer = tokenizer
        self.detokenizer = Detokenizer(tokenizer.backend_tokenizer) if tokenizer else None
        self._seq_ids = itertools.count()
        self._usage = _Usage()

    @classmethod
    def from_config(cls, model: ModelConfig, engine: EngineConfig) -> EngineCore:
        info = resolve(model, engine)
        tokenizer = None if model.skip_tokenizer_init else AutoTokenizer.from_pretrained(info.model_dir)
        max_batched = engine.max_num_batched_tokens or (8192 if info.device.type == "cuda" else 2048)
        load_format = "dummy" if model.load_format == "dummy" else "safetensors"
        executor = LocalExecutor(info, engine, load_format)
        num_blocks = engine.num_gpu_blocks or executor.num_available_blocks(max_batched)
        blocks_per_seq = cdiv(info.max_model_len, engine.block_size)
        if num_blocks < blocks_per_seq:
            source = ("num_gpu_blocks" if engine.num_gpu_blocks else
                      "gpu_memory_utilization" if info.device.type == "cuda" else "kv_cache_memory_gb")
            raise ValueError(
                f"the KV pool has {num_blocks} blocks of {engine.block_size} tokens, fewer than the "
                f"{blocks_per_seq} one sequence of max_model_len={info.max_model_len} needs: "
                f"raise {source} (one block takes {executor.block_bytes} bytes) or lower max_model_len")
        executor.init_kv_cache(num_blocks)
        logger.info("KV pool: %d blocks x %d tokens (%.1f MiB)", num_blocks, engine.block_size,
                    num_blocks * executor.block_bytes / 2**20)
        block_manager = BlockManager(num_blocks, engine.block_size,
                                     watermark_blocks=max(1, num_blocks // 100))
        scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=engine.max_num_seqs, max_num_batched_tokens=max_batched,
            max_model_len=info.max_model_len, eos_token_ids=info.eos_token_ids), block_manager)
        return cls(info, scheduler, executor, tokenizer)

    # -- requests ------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        self._validate(prompt_token_ids, params)
        seqs = [Sequence(next(self._seq_ids), list(prompt_token_ids)) for _ in range(params.best_of)]
        self.scheduler.add(SequenceGroup(request_id, seqs, params, prompt))

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; every block it holds is freed at once."""
        self.scheduler.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop ------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batched step; returns the requests that advanced (finished ones included)."""
        step_input = self.scheduler.schedule()
        if step_input.is_empty:
            return []
        step_output = self.executor.execute(step_input)
        advanced = self.scheduler.update(step_input, step_output)
        for group in advanced:
            self._detokenize(group)
        outputs = [_request_output(group) for group in advanced]
        self.scheduler.free_finished(advanced)
        self._record_usage()
        return outputs

    def get_memory_stats(self) -> dict[str, float | int]:
        bm = self.block_manager
        allocated = bm.num_allocated_blocks
        return {
            "total_blocks": bm.num_blocks,
            "free_blocks": bm.num_free_blocks,
            "allocated_blocks": allocated,
            "utilization": allocated / bm.num_blocks,
            "block_size": bm.block_size,
            "stored_tokens": bm.num_stored_tokens(),
            "slot_utilization": bm.num_stored_tokens() / (allocated * bm.block_size) if allocated else 1.0,
            "mean_slot_utilization": (self._usage.slot_utilization / self._usage.steps
                                      if self._usage.steps else 1.0),
            "peak_allocated_blocks": self._usage.peak_allocated_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
        }

    # -- helpers -------------------------------------------------------------
    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        info, engine_limits = self.info, self.scheduler.config
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids: the prompt must have at least one token")
        bad = next((t for t in prompt_token_ids if not 0 <= t < info.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids: token id {bad} is outside the vocabulary "
                             f"[0, {info.vocab_size})")
        if len(prompt_token_ids) > info.max_model_len:
            raise ValueError(f"prompt has {len(prompt_token_ids)} tokens, more than "
                             f"max_model_len={info.max_model_len}")
        if params.best_of > engine_limits.max_num_seqs:
            raise ValueError(f"best_of={params.best_of} exceeds max_num_seqs={engine_limits.max_num_seqs}")
        if params.stop and self.detokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine was built with "
                             "skip_tokenizer_init=True (use stop_token_ids instead)")
        longest = min(len(prompt_token_ids) + params.max_tokens, info.max_model_len)
        needed = params.best_of * cdiv(longest, self.block_manager.block_size)
        if needed > self.block_manager.num_blocks:
            raise ValueError(f"request needs up to {needed} KV blocks (best_of={params.best_of} x "
                             f"{longest} tokens), more than the pool's {self.block_manager.num_blocks}")

    def _detokenize(self, group: SequenceGroup) -> None:
        if self.detokenizer is None:
            return
        for seq in group.seqs:
            if seq.finish_reason is FinishReason.ABORT:
                continue
            stop = self.detokenizer.update(seq, group.sampling_params)
            if stop is not None and not seq.finished:
                self.scheduler.finish_seq(seq, FinishReason.STOP, stop)

    def _record_usage(self) -> None:
        allocated = self.block_manager.num_allocated_blocks
        if allocated:
            stored = self.block_manager.num_stored_tokens()
            self._usage.steps += 1
            self._usage.slot_utilization += stored / (allocated * self.block_manager.block_size)
            self._usage.peak_allocated_blocks = max(self._usage.peak_allocated_blocks, allocated)


def _request_output(group: SequenceGroup) -> RequestOutput:
    params = group.sampling_params
    seqs = group.seqs
    if params.best_of > params.n:
        seqs = sorted(seqs, key=lambda seq: seq.cumulative_logprob, reverse=True)[:params.n]
    outputs = [
        CompletionOutput(
            index=index,
            text=seq.output_text,
            token_ids=seq.output_token_ids,
            cumulative_logprob=seq.cumulative_logprob,
            logprobs=list(seq.output_logprobs) if params.logprobs is not None else None,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            stop_reason=seq.stop_reason,
        )
        for index, seq in enumerate(seqs)
    ]
    return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outputs,
                         finished=group.finished)
