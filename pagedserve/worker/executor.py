"""Executors: how EngineCore reaches its workers.

`LocalExecutor` runs the one worker in this process (tensor_parallel_size=1,
no Ray needed); it is what the offline `LLM` uses by default and what runs on a
GPU machine without Ray. `RayExecutor` (worker/ray_executor.py) runs one Ray
actor per tensor-parallel rank. Both return rank 0's StepOutput; the engine
picks one (engine/executors.py).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from pagedserve.config import EngineConfig
from pagedserve.model.info import ModelInfo
from pagedserve.scheduler.step import StepInput, StepOutput
from pagedserve.worker import cpu_threads
from pagedserve.worker.simulated import SimulatedWorker
from pagedserve.worker.worker import make_worker


class PendingStep(Protocol):
    def result(self) -> StepOutput: ...


class Executor(Protocol):
    worker_pids: list[int]  # the processes holding the model, rank 0 first

    @property
    def block_bytes(self) -> int: ...  # read-only: an attribute or a property satisfies it

    @property
    def weight_bytes(self) -> int: ...  # the model weights one worker (rank 0) holds

    def num_available_blocks(self, max_num_batched_tokens: int) -> int: ...

    def init_kv_cache(self, num_blocks: int, num_cpu_blocks: int) -> None: ...

    def execute(self, step: StepInput) -> StepOutput: ...

    def submit(self, step: StepInput) -> PendingStep:
        """Start a step and return at once; steps run in the order submitted."""
        ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    def __init__(self, info: ModelInfo, engine: EngineConfig, load_format: str) -> None:
        if info.device.type == "cpu" and engine.simulator is None:
            cpu_threads.apply(engine.cpu_threads)
        self.worker = make_worker(info, engine, load_format)
        self.worker_pids = [os.getpid()]
        # The device's queue: one thread runs the steps in order while the engine
        # plans the next (asynchronous scheduling). The simulator keeps its own.
        self._device = (ThreadPoolExecutor(1, thread_name_prefix="pagedserve-device")
                        if engine.uses_async_scheduling(info.device.type)
                        and engine.simulator is None else None)

    @property
    def block_bytes(self) -> int:
        return self.worker.block_bytes

    @property
    def weight_bytes(self) -> int:
        return self.worker.weight_bytes

    def num_available_blocks(self, max_num_batched_tokens: int) -> int:
        return self.worker.num_available_blocks(max_num_batched_tokens)

    def init_kv_cache(self, num_blocks: int, num_cpu_blocks: int) -> None:
        self.worker.init_kv_cache(num_blocks, num_cpu_blocks)

    def execute(self, step: StepInput) -> StepOutput:
        return self.worker.execute(step)

    def submit(self, step: StepInput) -> PendingStep:
        if isinstance(self.worker, SimulatedWorker):
            return self.worker.submit(step)
        if self._device is not None:
            return self._device.submit(self.worker.execute, step)
        done: Future = Future()
        try:
            done.set_result(self.worker.execute(step))
        except Exception as error:  # noqa: BLE001 - raised again by result()
            done.set_exception(error)
        return done

    def shutdown(self) -> None:
        """The worker lives and dies with this process; its queue stops here."""
        if self._device is not None:
            self._device.shutdown(wait=True)
