"""LLMServer: one model replica, the central scheduler of its engine.

It owns an EngineCore (with LocalExecutor, or RayExecutor and its
tensor-parallel worker actors) and drives it from one thread:

    generate() ──("add", id, tokens, params)──> inbox ──> step thread: engine.step()
       ^                                                        │
       └──────── asyncio queue per request <── RequestOutput ───┘

Only the step thread touches the engine, so requests, aborts and stats
queries go through its inbox and are applied between steps. The thread
sleeps while nothing is pending. `generate` is an async generator: a caller
that stops iterating (a client gone, a cancelled handle call) aborts the
request, which frees its blocks at the next step boundary. Outputs are
cumulative, so a caller that lags gets the newest one only: fewer, larger
updates instead of a growing backlog.

The class is plain Python; cluster/app.py turns it into a Ray Serve
deployment, and tests can drive it directly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import resource
import threading
from collections.abc import AsyncIterator
from typing import Any

from pagedserve.cluster import autoscaling, routing
from pagedserve.cluster.metrics import EngineMetrics
from pagedserve.config import Config, served_model_name
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.block_manager import cdiv
from pagedserve.scheduler.engine_core import EngineCore
from pagedserve.worker.ray_executor import normal_priority

logger = logging.getLogger(__name__)
# The newest cached blocks a replica reports to the prefix-aware router.
MAX_FINGERPRINTS = 65536


class EngineOverloadedError(RuntimeError):
    """The waiting queue is at its bound: the client should retry later."""

    def __init__(self, waiting: int, limit: int) -> None:
        super().__init__(waiting, limit)  # the args rebuild it when Ray pickles it
        self.waiting, self.limit = waiting, limit

    def __str__(self) -> str:
        return f"{self.waiting} requests are waiting, the limit is {self.limit}"


class EngineDeadError(RuntimeError):
    """The step loop stopped; this replica cannot serve."""


class LLMServer:
    def __init__(self, config: Config) -> None:
        normal_priority("the LLMServer replica")
        self.config = config
        self.engine = EngineCore.from_config(config)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._adding: set[str] = set()  # sent, not yet in the scheduler: they wait too
        self._error: BaseException | None = None
        self.metrics = EngineMetrics(served_model_name(config), _replica_name())
        self._state = self._read_state()  # the step thread replaces it after every step
        self._thread = threading.Thread(target=self._run, name="pagedserve-step-loop", daemon=True)
        self._thread.start()

    # -- the API the ingress calls --------------------------------------------
    def model_info(self) -> dict[str, Any]:
        info = self.engine.info
        return {"model_dir": str(info.model_dir), "max_model_len": info.max_model_len,
                "vocab_size": info.vocab_size}

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request as steps produce them, the last one finished."""
        self._raise_if_dead()
        limit = self.config.serving.max_waiting_requests
        # Requests not yet admitted, less the free running slots they will take.
        scheduler = self.engine.scheduler
        free_slots = max(0, self.config.engine.max_num_seqs - len(scheduler.running))
        waiting = max(0, len(scheduler.waiting) + len(self._adding) - free_slots)
        if waiting >= limit:
            raise EngineOverloadedError(waiting, limit)
        self.engine.validate(prompt_token_ids, params)  # reads only limits: safe off the thread
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running")
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        self._adding.add(request_id)
        self._send("add", request_id, prompt_token_ids, params)
        finished = False
        interval = self.config.serving.stream_interval_s
        try:
            while not finished:
                item = await outputs.get()
                if interval and not isinstance(item, BaseException) and not item.finished:
                    await asyncio.sleep(interval)  # let more steps land: one larger update
                # Outputs are cumulative: when the caller lags behind the steps, the
                # newest one says everything the skipped ones did, in one message.
                while not isinstance(item, BaseException) and not outputs.empty():
                    item = outputs.get_nowait()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                if finished:
                    self.metrics.record_request(item)
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the caller left early: give the blocks back
                self._send("abort", request_id)

    async def stats(self) -> dict[str, Any]:
        """KV memory stats and queue lengths, read between steps."""
        self._raise_if_dead()
        answer: concurrent.futures.Future = concurrent.futures.Future()
        self._send("stats", answer)
        return await asyncio.wrap_future(answer)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What the autoscaling policies read (cluster/autoscaling.py), as of the last step."""
        state = self._state
        return {autoscaling.KV_UTILIZATION: state["kv_cache_usage_perc"],
                autoscaling.NUM_RUNNING: state["num_requests_running"],
                autoscaling.NUM_WAITING: (state["num_requests_waiting"]
                                          + state["num_requests_swapped"] + len(self._adding)),
                autoscaling.BLOCKS_DEMANDED: state["blocks_demanded"],
                autoscaling.TOTAL_BLOCKS: state["total_blocks"]}

    async def record_routing_stats(self) -> dict[str, Any]:
        """For the prefix-aware router (cluster/routing.py): what this replica has cached."""
        self._raise_if_dead()
        answer: concurrent.futures.Future = concurrent.futures.Future()
        self._send("routing", answer)
        return await asyncio.wrap_future(answer)

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy."""
        self._raise_if_dead()

    def shutdown(self) -> None:
        self._send("stop")
        self._thread.join(timeout=30)
        self.engine.shutdown()

    # -- the step thread ------------------------------------------------------
    def _send(self, *message: Any) -> None:
        self._inbox.put(message)
        self._wakeup.set()

    def _run(self) -> None:
        try:
            while self._apply_inbox():
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                for output in self.engine.step():
                    self._deliver(output.request_id, output)
                self._state = self._read_state()
                self.metrics.record_step(self._state)
        except BaseException as error:  # noqa: BLE001 - every waiter must hear of it
            logger.exception("the step loop died")
            self._error = error
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDeadError(f"the engine stopped: {error!r}"))

    def _apply_inbox(self) -> bool:
        """Apply what arrived since the last step; False once asked to stop."""
        while True:
            try:
                kind, *args = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if kind == "add":
                request_id, prompt_token_ids, params = args
                try:
                    self.engine.add_request(request_id, prompt_token_ids, params)
                except ValueError as error:
                    self._deliver(request_id, error)
                finally:
                    self._adding.discard(request_id)
            elif kind == "abort":
                self.engine.abort_request(args[0])
            elif kind == "stats":
                # Where the engine runs, for operators (and the fault tests) to find it.
                stats = {**self.engine.get_memory_stats(), "pid": os.getpid(),
                         "worker_pids": list(self.engine.executor.worker_pids),
                         "peak_rss_bytes": _peak_rss_bytes()}
                args[0].set_result(stats)
            elif kind == "routing":
                keys = self.engine.block_manager.cached_block_keys()[-MAX_FINGERPRINTS:]
                args[0].set_result({routing.FINGERPRINTS: [routing.fingerprint(k) for k in keys]})
            elif kind == "stop":
                return False

    def _read_state(self) -> dict[str, float]:
        """Queue lengths, block usage and running totals, read between steps."""
        bm, scheduler = self.engine.block_manager, self.engine.scheduler
        # A waiting prompt takes its blocks (less any prefix-cache hits) once admitted.
        waiting_blocks = sum(cdiv(len(group.prompt_token_ids), bm.block_size)
                             for group in scheduler.waiting)
        return {"kv_cache_usage_perc": bm.num_allocated_blocks / bm.num_blocks,
                "num_requests_running": len(scheduler.running),
                "num_requests_waiting": len(scheduler.waiting),
                "num_requests_swapped": len(scheduler.swapped),
                "prefix_cache_queries_total": bm.prefix_query_tokens,
                "prefix_cache_hits_total": bm.prefix_hit_tokens,
                "num_preemptions_total": scheduler.num_preemptions,
                "blocks_demanded": bm.num_allocated_blocks + waiting_blocks + bm.num_swapped_blocks,
                "total_blocks": bm.num_blocks}

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, outputs = stream
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, item)
            except RuntimeError:  # its event loop closed: nobody is listening any more
                self._streams.pop(request_id, None)

    def _raise_if_dead(self) -> None:
        if self._error is not None or not self._thread.is_alive():
            raise EngineDeadError(f"the engine's step loop is not running: {self._error!r}")


def _peak_rss_bytes() -> int:
    """The most resident memory this process has held (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _replica_name() -> str:
    """This Serve replica's id, or "local" outside Serve (tests drive LLMServer directly)."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a replica: RayServeException, or no Ray
        return "local"
