"""LLMServer: one model replica, a thin Ray Serve wrapper over AsyncLLMEngine.

The engine (engine/async_engine.py) owns the step thread, the request
queues and aborting on a consumer that leaves. The server adds what a replica
needs on top: the bound on waiting requests (503 + Retry-After beyond it),
Ray metrics after each step, and the stats Serve's autoscaler and the
prefix-aware router read. It reads the engine only through its API and its
`EngineStats` snapshot.

The class is plain Python; cluster/app.py turns it into a Ray Serve
deployment, and tests can drive it directly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import resource
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import ray

from pagedserve.cluster import autoscaling, routing
from pagedserve.cluster.channel import Outbox, collect_less_often, crosses_as_deltas
from pagedserve.cluster.metrics import EngineMetrics
from pagedserve.config import Config
from pagedserve.engine.stats import EngineStats
from pagedserve.errors import EngineOverloadedError
from pagedserve.lora_request import LoRARequest
from pagedserve.model.embedded import served_model_name
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams
from pagedserve.worker.ray_utils import normal_priority, ranks_device_type
from pagedserve.worker.ray_worker import spawn_ranks

if TYPE_CHECKING:
    from pagedserve.engine.async_engine import AsyncLLMEngine

__all__ = ["LLMServer"]
# The newest cached blocks a replica reports to the prefix-aware router.
MAX_FINGERPRINTS = 65536


class LLMServer:
    def __init__(self, config: Config) -> None:
        normal_priority("the LLMServer replica")
        collect_less_often()
        self.config = config
        self.metrics = EngineMetrics(served_model_name(config), _replica_name(), _node_id())
        # The ranks first, from a module that imports no torch (nor does this one): their
        # processes import the model stack while this one imports the engine.
        ranks = (spawn_ranks(config.parallel, ranks_device_type(config.engine) == "cuda")
                 if config.parallel.executor_backend == "ray" else None)
        from pagedserve.engine.async_engine import AsyncLLMEngine

        try:
            self.engine: AsyncLLMEngine = AsyncLLMEngine.from_config(config, ranks)
        except BaseException:
            if ranks is not None:
                ranks.shutdown()  # started for an engine that could not be built
            raise
        self.engine.on_step = self.metrics.record_step
        self._outboxes: dict[Any, Outbox] = {}  # by the ingress replica's Inbox actor

    # -- the API the ingress calls --------------------------------------------
    def model_info(self) -> dict[str, Any]:
        info = self.engine.info
        return {"model_dir": str(info.model_dir), "tokenizer_dir": str(info.tokenizer_path),
                "max_model_len": info.max_model_len,
                "vocab_size": info.vocab_size}

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, inbox: Any = None,
                       lora: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """One request's outputs as steps produce them, the last one finished.

        They cross to the ingress as deltas (the new token ids, text and logprobs),
        at most one message per step, without the prompt's ids (`prompt_token_ids`
        is None: the ingress has them, and puts them back). Requests whose best_of
        exceeds n re-rank their candidates every step and are sent cumulative. With an
        `inbox` (cluster/channel.py), only the first output is yielded; the rest
        go into the inbox with the other requests' outputs of the same step, put
        there as the engine hands the step over (this call is not woken per
        step), and the call returns once the last one is there. `lora`: the adapter to run
        under (cluster/adapters.py), registered here on first sight.
        """
        await self.engine.check_health()
        limit = self.config.serving.max_waiting_requests
        waiting = self.engine.stats().num_waiting_for_a_slot(self.engine.num_pending,
                                                             self.config.engine.max_num_seqs)
        if waiting >= limit:
            raise EngineOverloadedError(waiting, limit)
        interval = self.config.serving.stream_interval_s
        as_deltas = crosses_as_deltas(params)
        if as_deltas:
            params = dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)
        generated: dict[int, int] = {}  # tokens so far, per choice index

        def count(output: RequestOutput) -> None:
            for choice in output.outputs:
                tokens = len(choice.token_ids)
                generated[choice.index] = generated.get(choice.index, 0) + tokens \
                    if as_deltas else tokens
            if output.finished:
                self.metrics.record_request(output, len(prompt_token_ids), generated)

        outbox = self._outbox(inbox) if inbox is not None else None
        outboxed = False  # whether any output went through the outbox

        def hand_over(output: RequestOutput) -> None:
            """An output after the first, into the outbox as its step hands it over."""
            nonlocal outboxed
            assert outbox is not None  # handed over only with an inbox
            count(output)
            output.prompt_token_ids = None  # the ingress has them
            outbox.add(request_id, output)
            outboxed = True

        first = True
        async for output in self.engine.generate({"prompt_token_ids": prompt_token_ids}, params,
                                                 request_id, lora_request=lora,
                                                 on_output=hand_over if outbox is not None and
                                                 not interval else None):
            if first or outbox is None:
                count(output)
                output.prompt_token_ids = None  # the ingress has them
                first = False
                yield output
            else:  # with a stream interval: it paces this loop
                hand_over(output)
            if interval and not output.finished:
                # Let more steps land: the engine hands over the newest, one larger update.
                await asyncio.sleep(interval)
        if outbox is not None and outboxed:
            await outbox.delivered()  # the last output is in the inbox before the call ends

    def _outbox(self, inbox: Any) -> Outbox:
        """The outbox to an ingress's inbox; a failed one is replaced."""
        outbox = self._outboxes.get(inbox)
        if outbox is None or outbox.error is not None:
            for key in [key for key, box in self._outboxes.items() if box.error is not None]:
                del self._outboxes[key]  # their ingress replicas are gone
            outbox = self._outboxes[inbox] = Outbox(inbox)
        return outbox

    async def check_lora(self, lora: LoRARequest) -> None:
        """Register an adapter (a load at run time): RequestError if it cannot be served."""
        await self.engine.add_lora(lora)

    async def stats(self) -> dict[str, Any]:
        """KV memory stats and queue lengths, read between steps, and where the engine runs
        (for operators, and the fault tests, to find it)."""
        return {**await self.engine.get_memory_stats(), "pid": os.getpid(),
                "node_id": _node_id(), "worker_pids": self.engine.worker_pids,
                "peak_rss_bytes": _peak_rss_bytes()}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What the autoscaling policies read (cluster/autoscaling.py), as of the last step."""
        stats: EngineStats = self.engine.stats()
        return {autoscaling.KV_UTILIZATION: stats.utilization,
                autoscaling.NUM_RUNNING: stats.num_running,
                autoscaling.NUM_WAITING: stats.num_not_running(self.engine.num_pending),
                autoscaling.BLOCKS_DEMANDED: stats.blocks_demanded,
                autoscaling.TOTAL_BLOCKS: stats.total_blocks}

    async def record_routing_stats(self) -> dict[str, Any]:
        """For the prefix-aware router (cluster/routing.py): what this replica has cached."""
        keys = (await self.engine.cached_block_keys())[-MAX_FINGERPRINTS:]
        return {routing.FINGERPRINTS: [routing.fingerprint(key) for key in keys],
                routing.ADAPTERS: await self.engine.resident_loras()}

    async def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy."""
        await self.engine.check_health()

    def shutdown(self) -> None:
        self.engine.shutdown()


def _peak_rss_bytes() -> int:
    """The most resident memory this process has held (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _node_id() -> str:
    """The Ray node this process runs on, or "local" outside Ray."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def _replica_name() -> str:
    """This Serve replica's id, or "local" outside Serve (tests drive LLMServer directly)."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a replica: RayServeException, or no Ray
        return "local"
