"""EngineCore: schedule -> execute -> update, one step at a time.

The offline `LLM` and `AsyncLLMEngine` (and through it the serving replica)
drive this loop; neither knows about blocks or workers. Requests come in as
token ids; text appears only on the way out (incremental detokenization,
stop strings).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pagedserve.config import Config, EngineConfig
from pagedserve.engine.adapters import AdapterRegistry
from pagedserve.engine.capacity import swap_blocks
from pagedserve.engine.executors import choose_device, choose_dtype, make_executor
from pagedserve.engine.grammar import GrammarLimits, StructuredOutputs
from pagedserve.engine.request_inputs import InputProcessor, PromptInput
from pagedserve.engine.request_outputs import OutputBuilder
from pagedserve.engine.speculation import draft_model, speculation_policy
from pagedserve.engine.stats import EngineStats, HostClock, SlotUsage, StepStats
from pagedserve.lora_request import LoRARequest
from pagedserve.math_utils import cdiv
from pagedserve.model.info import ModelInfo
from pagedserve.model.resolve import resolve
from pagedserve.model.rules import check_pool_holds_a_sequence
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams
from pagedserve.scheduler.adapter_slots import AdapterSlots
from pagedserve.scheduler.block_manager import BlockManager
from pagedserve.scheduler.detokenizer import Detokenizer
from pagedserve.scheduler.scheduler import Scheduler, SchedulerConfig
from pagedserve.scheduler.sequence import FinishReason, SequenceGroup
from pagedserve.scheduler.step import StepInput, StepOutput
from pagedserve.worker.executor import Executor, LocalExecutor, PendingStep
from pagedserve.worker.token_masks import PendingBitmask

if TYPE_CHECKING:
    from pagedserve.worker.ray_worker import Ranks

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, info: ModelInfo, scheduler: Scheduler, executor: Executor,
                 tokenizer: PreTrainedTokenizerBase | None,
                 async_scheduling: bool = False,
                 grammar_limits: GrammarLimits | None = None) -> None:
        self.info = info
        self.scheduler = scheduler
        self.adapters = AdapterRegistry(info.lora, info.hf_config, unload=self.remove_lora)
        scheduler.adapters.on_unloaded = self.adapters.remove
        self.block_manager = scheduler.block_manager
        self.executor = executor
        self.tokenizer = tokenizer
        self.inputs = InputProcessor(info, scheduler.config, tokenizer=tokenizer,
                                     block_size=self.block_manager.block_size,
                                     num_blocks=self.block_manager.num_blocks)
        self.detokenizer = Detokenizer(tokenizer.backend_tokenizer) if tokenizer else None
        self.structured = StructuredOutputs(tokenizer, info.vocab_size,
                                            grammar_limits or GrammarLimits())
        self.async_scheduling = async_scheduling
        # Steps sent to the device, oldest first: at most two with async scheduling.
        self._in_flight: deque[tuple[StepInput, PendingStep]] = deque()
        self._usage = SlotUsage()
        self.outputs = OutputBuilder(tokenizer)
        self._step_stats = StepStats()
        self._busy_since: float | None = None  # start of the last step() call that left work
        self._host = HostClock()

    @classmethod
    def from_config(cls, config: Config, ranks: Ranks | None = None) -> EngineCore:
        """`ranks`: Ray rank actors already started for this engine (spawn_ranks)."""
        model, engine, parallel = config.model, config.engine, config.parallel
        simulated = engine.simulator is not None
        info = resolve(model, choose_device(engine, parallel), parallel, simulated=simulated)
        info = dataclasses.replace(info, dtype=choose_dtype(info.dtype, info.device))
        if config.lora.enable_lora:
            info = dataclasses.replace(info, lora=config.lora)
        info = dataclasses.replace(info, draft=draft_model(config, info))
        tokenizer = None if model.skip_tokenizer_init else AutoTokenizer.from_pretrained(
            info.tokenizer_path, trust_remote_code=model.trust_remote_code)
        device_type = "cuda" if simulated else info.device.type  # a simulated GPU is a GPU
        limits = SchedulerConfig.from_engine(engine, max_model_len=info.max_model_len,
                                             eos_token_ids=info.eos_token_ids,
                                             device_type=device_type)
        load_format = "dummy" if model.load_format == "dummy" else "safetensors"
        executor = make_executor(info, engine, parallel, load_format, ranks)
        # An in-process worker's sampling can wait for a mask filled after its step was
        # sent; one behind Ray has its step whole.
        limits = dataclasses.replace(limits, late_masks=engine.uses_async_scheduling(
            device_type) and isinstance(executor, LocalExecutor),
            speculation=speculation_policy(limits.speculation, info, engine, parallel))
        try:
            block_manager = cls._init_kv_cache(info, engine, executor,
                                               limits.max_num_batched_tokens)
        except BaseException:
            executor.shutdown()
            raise
        slots = AdapterSlots(config.lora.max_loras) if config.lora.enable_lora else None
        grammars = config.structured_outputs
        core = cls(info, Scheduler(limits, block_manager, slots), executor, tokenizer,
                   async_scheduling=engine.uses_async_scheduling(device_type),
                   grammar_limits=GrammarLimits(grammars.max_spec_bytes,
                                                grammars.compile_timeout_s,
                                                grammars.compile_threads))
        try:  # the served adapters (ids 1, 2, ... as cluster/adapters.py numbers them)
            for lora_id, module in enumerate(config.lora.modules, start=1):
                core.add_lora(LoRARequest(module.name, lora_id, module.path))
        except BaseException:
            core.shutdown()
            raise
        return core

    @staticmethod
    def _init_kv_cache(info: ModelInfo, engine: EngineConfig, executor: Executor,
                       max_batched: int) -> BlockManager:
        """Size the KV pool (every rank holds the same block ids) and its block manager."""
        num_blocks = engine.num_gpu_blocks or executor.num_available_blocks(max_batched)
        on_gpu = info.device.type == "cuda" or engine.simulator is not None
        check_pool_holds_a_sequence(num_blocks, engine, info.max_model_len, on_gpu,
                                    executor.block_bytes)
        num_cpu_blocks = swap_blocks(engine, num_blocks, executor.block_bytes)
        executor.init_kv_cache(num_blocks, num_cpu_blocks)
        logger.info("KV pool: %d blocks x %d tokens (%.1f MiB per rank, kv_cache_dtype %s), "
                    "CPU swap pool %d blocks", num_blocks, engine.block_size,
                    num_blocks * executor.block_bytes / 2**20, engine.kv_cache_dtype,
                    num_cpu_blocks)
        return BlockManager(num_blocks, engine.block_size,
                            watermark_blocks=max(1, num_blocks // 100),
                            num_cpu_blocks=num_cpu_blocks,
                            enable_prefix_caching=engine.enable_prefix_caching,
                            sliding_window=info.shape.window_of_every_layer)

    def shutdown(self) -> None:
        """Stop the workers (Ray actors and their placement group, if any)."""
        self._release_masks()
        self._in_flight.clear()
        self.structured.shutdown()
        self.executor.shutdown()

    # -- requests ------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, lora_request: LoRARequest | None = None,
                    grammar=None) -> None:
        """Queue a request. A structured output's grammar is compiled here, waiting up to
        the time limit, unless the caller compiled it off the loop (`grammar`)."""
        self.validate(prompt_token_ids, params)
        params = self.inputs.with_bad_words(
            self.inputs.with_max_tokens(len(prompt_token_ids), params))
        adapter = self.adapters.resolve(lora_request)
        # One sequence computes the prompt; samples and beams fork from it.
        group = SequenceGroup(request_id, [self.scheduler.new_sequence(prompt_token_ids)], params,
                              prompt, lora=adapter)
        group.beam_search = self.inputs.beam_search(len(prompt_token_ids), params)
        if params.structured_outputs is not None:
            group.seqs[0].grammar = self.structured.matcher(params.structured_outputs, grammar)
        self.scheduler.add(group)

    def prompt_token_ids(self, prompt: PromptInput) -> list[int]:
        """A prompt's token ids: given, or from the tokenizer."""
        return self.inputs.prompt_token_ids(prompt)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Refuse a request this engine could never serve (RequestError naming the limit)."""
        self.inputs.validate(prompt_token_ids, params)
        if params.structured_outputs is not None:
            self.structured.validate(params.structured_outputs)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; every block it holds is freed at once. Returns its last
        output (finish reason "abort"), or None for an unknown id."""
        group = self.scheduler.abort(request_id)
        if group is None:
            return None
        output = self.outputs.build(group)
        self.outputs.forget(request_id)
        return output

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Register an adapter ahead of its requests (its files are checked now); one
        being unloaded is kept after all."""
        self.adapters.reopen(lora_request.lora_int_id)
        self.scheduler.adapters.reopen(lora_request.lora_int_id)
        self.adapters.resolve(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        """Unload an adapter: at once if no request uses it (True); otherwise new
        requests for it are refused and it goes when its last request ends."""
        self.adapters.closing(lora_id)
        return self.scheduler.adapters.unload(lora_id)

    def list_loras(self) -> list[LoRARequest]:
        return self.adapters.requests()

    def resident_loras(self) -> list[str]:
        """The names of the adapters in device slots, in slot order."""
        slots = self.scheduler.adapters.slots
        names = {request.lora_int_id: request.lora_name for request in self.list_loras()}
        return [names[i] for i in (slots.resident() if slots else []) if i in names]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._in_flight)

    # -- the loop ------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batched step; returns the requests that advanced (finished ones included).

        With async scheduling the device is kept one step ahead, as vLLM's
        async scheduler does: step N+1 is planned and sent while step N runs,
        then N's tokens are taken in. A decode in N+1 takes the token N samples
        as its input on the worker (ScheduledSequence.last_token_in_flight). A
        sequence that N finishes (EOS, a stop string) has one more token
        computed in N+1, which is dropped, and its blocks are freed when N's
        outcome arrives.
        """
        started = time.perf_counter()
        stats = self._step_stats
        if self._busy_since is not None:
            stats.wall_s += started - self._busy_since
        self._host.start()
        try:
            return self._step()
        finally:
            self._host.stop()
            if self.has_unfinished_requests():
                self._busy_since = started
            else:
                stats.wall_s += time.perf_counter() - started
                self._busy_since = None

    def _step(self) -> list[RequestOutput]:
        if not self.async_scheduling:
            step_input = self._schedule()
            if step_input.is_empty:
                return []
            return self._take_in(step_input, self._wait(self.executor.execute, step_input))
        # A step that speculates is taken in before the next is planned: its sequences
        # cannot plan ahead, and would otherwise run in every other step, splitting
        # the batch in two.
        if len(self._in_flight) < 2 and not (self._in_flight
                                             and self._in_flight[-1][0].speculates):
            step_input = self._schedule()
            if not step_input.is_empty:
                self._in_flight.append((step_input, self.executor.submit(step_input)))
                if len(self._in_flight) < 2:
                    return []  # the device has its step; the next is planned while it runs
        if not self._in_flight:
            return []
        step_input, pending = self._in_flight.popleft()
        try:
            outputs = self._take_in(step_input, self._wait(pending.result))
        except BaseException:
            self._release_masks()
            raise
        if self._in_flight:  # its sampling waits for the masks that these tokens decide
            self.structured.fill_late(self._in_flight[0][0], self.scheduler.grammar_of)
        return outputs

    def _wait(self, device: Callable[..., StepOutput], *args: StepInput) -> StepOutput:
        """A call that waits for the device: not the host's work."""
        self._host.stop()
        try:
            return device(*args)
        finally:
            self._host.start()

    def _schedule(self) -> StepInput:
        """The scheduler's next step, with the masks of its constrained sequences: filled
        now, or, where a step still runs before it, once that step is taken in."""
        late = self.scheduler.config.late_masks and bool(self._in_flight)
        return self.structured.attach_masks(self.scheduler.schedule(), self.scheduler.grammar_of,
                                            late)

    def _release_masks(self) -> None:
        """Let steps in flight whose masks will never be filled end (with an error)."""
        for step_input, _ in self._in_flight:
            if isinstance(step_input.token_bitmask, PendingBitmask):
                step_input.token_bitmask.cancel()

    def _take_in(self, step_input: StepInput, step_output: StepOutput) -> list[RequestOutput]:
        """A step's outcome: tokens recorded, text decoded, finished requests freed."""
        self._step_stats.steps += 1
        self._step_stats.device_s += step_output.device_s or 0.0
        host_s = self._host.lap()  # this step's: since the step before was taken in
        if self.scheduler.config.speculation is not None and step_input.seqs:
            self.scheduler.spec_stats.observe_host(len(step_input.seqs), host_s)
        advanced = self.scheduler.update(step_input, step_output)
        now = time.monotonic()
        outputs = []
        for group in advanced:
            self._detokenize(group)
            metrics = group.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now  # advancing means a token was sampled
            finished = group.finished
            if finished:
                metrics.finished_time = now
            # A FINAL_ONLY request (the offline LLM's) needs no output until it ends.
            if finished or group.sampling_params.output_kind is not RequestOutputKind.FINAL_ONLY:
                output = self.outputs.build(group)
                output.metrics = dataclasses.replace(metrics)
                outputs.append(output)
        self.scheduler.free_finished(advanced)
        for group in advanced:
            if group.finished:
                self.outputs.forget(group.request_id)
        self._usage.record(self.block_manager)
        return outputs

    def stats(self) -> EngineStats:
        bm, scheduler, usage = self.block_manager, self.scheduler, self._usage
        allocated, stored = bm.num_allocated_blocks, bm.num_stored_tokens()
        # A waiting prompt takes its blocks (less any prefix-cache hits) once admitted.
        waiting_blocks = sum(cdiv(len(group.prompt_token_ids), bm.block_size)
                             for group in scheduler.waiting)
        return EngineStats(
            total_blocks=bm.num_total_blocks, free_blocks=bm.num_free_blocks,
            allocated_blocks=allocated, logical_blocks=bm.num_logical_blocks,
            physical_blocks=allocated, cached_blocks=bm.num_cached_blocks,
            swapped_blocks=bm.num_swapped_blocks, cpu_blocks=bm.num_cpu_blocks,
            block_size=bm.block_size, utilization=allocated / bm.num_blocks,
            stored_tokens=stored,
            slot_utilization=stored / (allocated * bm.block_size) if allocated else 0.0,
            mean_slot_utilization=usage.slot_utilization / usage.steps if usage.steps else 0.0,
            peak_allocated_blocks=usage.peak_allocated_blocks,
            blocks_demanded=allocated + waiting_blocks + bm.num_swapped_blocks,
            prefix_cache_queries=bm.prefix_query_tokens, prefix_cache_hits=bm.prefix_hit_tokens,
            prefix_cache_hit_rate=(bm.prefix_hit_tokens / bm.prefix_query_tokens
                                   if bm.prefix_query_tokens else 0.0),
            num_running=len(scheduler.running), num_waiting=scheduler.waiting_queue_size,
            num_swapped=len(scheduler.swapped), num_preemptions=scheduler.num_preemptions,
            num_swap_preemptions=scheduler.num_swaps, weight_bytes=self.executor.weight_bytes,
            block_bytes=self.executor.block_bytes,
            spec_decode_num_draft_tokens=scheduler.spec_stats.draft_tokens,
            spec_decode_num_accepted_tokens=scheduler.spec_stats.accepted_tokens,
            **self._lora_stats())

    def _lora_stats(self) -> dict:
        scheduler = self.scheduler
        use = scheduler.adapters
        slots = use.slots
        if slots is None:
            return {}
        return {"max_loras": slots.max_loras, "lora_running": use.count(scheduler.running),
                "lora_waiting": use.count([*scheduler.waiting, *scheduler.swapped]),
                "lora_loads": slots.loads, "lora_evictions": slots.evictions}

    def get_memory_stats(self) -> dict[str, float | int]:
        return dataclasses.asdict(self.stats())

    def get_step_stats(self) -> dict[str, float | int]:
        """Steps so far; `device_s`, the device time they took; `wall_s`, the wall
        time the engine spent stepping them (from a step() call to the next while
        work remained); `host_s`, the wall time not covered by device time: what the
        device waited for the host."""
        stats = self._step_stats
        return {"steps": stats.steps, "device_s": stats.device_s, "wall_s": stats.wall_s,
                "host_s": max(0.0, stats.wall_s - stats.device_s)}

    def get_spec_decode_stats(self) -> dict[str, float]:
        """Speculative decoding so far: draft_tokens, accepted_tokens, acceptance_rate
        and mean_accepted_length (tokens per verification, the sampled one included)."""
        return self.scheduler.spec_stats.as_dict()

    def reset_step_stats(self) -> None:
        """Start counting afresh (a step under way counts from now)."""
        self._step_stats = StepStats()
        if self._busy_since is not None:
            self._busy_since = time.perf_counter()

    def cached_block_keys(self) -> list:
        """Keys of the cached blocks, oldest first (what the prefix-aware router matches)."""
        return self.block_manager.cached_block_keys()

    @property
    def worker_pids(self) -> list[int]:
        """The processes holding the model, rank 0 first."""
        return list(self.executor.worker_pids)

    # -- helpers -------------------------------------------------------------
    def _detokenize(self, group: SequenceGroup) -> None:
        if self.detokenizer is None or group.beam_search is not None:
            return  # beams fork and drop: their text is decoded once, at the end
        for seq in group.seqs:
            if seq.finish_reason is FinishReason.ABORT:
                continue
            stop = self.detokenizer.update(seq, group.sampling_params)
            if stop is not None and not seq.finished:
                self.scheduler.finish_seq(seq, FinishReason.STOP, stop)
