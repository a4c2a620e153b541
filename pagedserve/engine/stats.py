"""One snapshot of an engine between steps: its KV pool, its queues and running totals.

Every statistic has one home here: `LLM.get_memory_stats()`, the server's
`/stats`, its metrics and its autoscaling and routing reports all read it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pagedserve.scheduler.block_manager import BlockManager


@dataclass(frozen=True)
class EngineStats:
    # The pool, in blocks.
    total_blocks: int
    free_blocks: int
    allocated_blocks: int
    logical_blocks: int  # table entries over all sequences; their gap to physical is sharing
    physical_blocks: int
    cached_blocks: int
    swapped_blocks: int
    cpu_blocks: int
    block_size: int
    utilization: float  # allocated / total
    stored_tokens: int
    slot_utilization: float  # stored tokens over allocated slots; 0 with nothing allocated
    mean_slot_utilization: float  # the same, averaged over the steps so far
    peak_allocated_blocks: int
    # What running and waiting requests demand: allocated, waiting prompts, swapped out.
    blocks_demanded: int
    # The prefix cache, as running totals of prompt tokens.
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_cache_hit_rate: float
    # The queues. `num_waiting` is the scheduler's waiting queue (new requests and
    # ones preempted to recompute), vLLM's num_requests_waiting; the two methods
    # below are the other "waiting" counts a replica needs.
    num_running: int
    num_waiting: int
    num_swapped: int
    num_preemptions: int
    num_swap_preemptions: int
    # The model weights one worker holds (rank 0's share under tensor parallelism):
    # quantized weights at their stored size.
    weight_bytes: int = 0
    # One KV block on one worker: every layer's keys and values of block_size tokens,
    # in engine.kv_cache_dtype (fp8: one byte a value, half of bfloat16's).
    block_bytes: int = 0
    # LoRA: requests per adapter name (running; waiting or swapped), and the device
    # slots' loads and evictions so far (0 and empty without enable_lora).
    max_loras: int = 0
    lora_running: dict[str, int] = field(default_factory=dict)
    lora_waiting: dict[str, int] = field(default_factory=dict)
    lora_loads: int = 0
    lora_evictions: int = 0
    # Speculative decoding: tokens proposed and kept so far (0 without it).
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0

    # The engine holds requests sent but not yet in the scheduler, which this snapshot,
    # taken at the last step, cannot see: `num_pending` (AsyncLLMEngine.num_pending).
    def num_not_running(self, num_pending: int) -> int:
        """Requests not running: waiting, swapped out, or not yet in the scheduler.
        What the autoscaler reads as waiting (cluster/autoscaling.py's NUM_WAITING)."""
        return self.num_waiting + self.num_swapped + num_pending

    def num_waiting_for_a_slot(self, num_pending: int, max_num_seqs: int) -> int:
        """Requests not yet admitted (waiting or not yet in the scheduler; swapped ones
        are not counted) less the free running slots they will take: what the
        replica's bound on waiting requests limits."""
        free_slots = max(0, max_num_seqs - self.num_running)
        return max(0, self.num_waiting + num_pending - free_slots)


@dataclass
class StepStats:
    """Where the engine's stepping time went (see EngineCore.get_step_stats)."""

    steps: int = 0
    device_s: float = 0.0
    wall_s: float = 0.0


class HostClock:
    """The engine thread's CPU time in its own work: its step() calls, less the waits
    for the device (a step's outcome, or a synchronous step run in this thread). Read
    once a step, it is that step's host work."""

    def __init__(self) -> None:
        self._spent = 0.0
        self._mark: float | None = None

    def start(self) -> None:
        self._mark = time.thread_time()

    def stop(self) -> None:
        if self._mark is not None:
            self._spent += time.thread_time() - self._mark
            self._mark = None

    def lap(self) -> float:
        """Seconds spent since the last lap; the clock goes on."""
        self.stop()
        spent, self._spent = self._spent, 0.0
        self.start()
        return spent


@dataclass
class SlotUsage:
    """KV slot usage summed over steps, for the mean the benchmark reports."""

    steps: int = 0
    slot_utilization: float = 0.0
    peak_allocated_blocks: int = 0

    def record(self, bm: BlockManager) -> None:
        """Count one step's pool, if anything holds blocks."""
        allocated = bm.num_allocated_blocks
        if allocated:
            self.steps += 1
            self.slot_utilization += bm.num_stored_tokens() / (allocated * bm.block_size)
            self.peak_allocated_blocks = max(self.peak_allocated_blocks, allocated)

