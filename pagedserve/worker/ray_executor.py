"""RayExecutor: one Ray actor per tensor-parallel rank, gang-placed in a placement group.

    EngineCore ── what the step changed, once ──> RayWorker rank 0 ──> StepOutput
                                             ├──> RayWorker rank 1 ──> None
                                             └──> ...               (all-reduce between ranks)

The ranks join one torch.distributed group (NCCL on CUDA, gloo on CPU) whose
rendezvous address is rank 0's node; only rank 0 samples and returns the
StepOutput, its samples as tuples. Each step goes as what changed since the step
before (a decoding sequence as its new token's fields and new blocks,
worker/step_wire.py), serialized once, one of two ways (`ray_compiled_graph`):

- plain actor calls (the default on CPU): one `ray.put` whose ref every rank
  reads (inline for a single rank), one call per rank;
- a Ray compiled graph (the default on GPUs): one write to a shared-memory
  channel every rank reads; cheaper per step, but each rank's reader spins
  a CPU core while it waits, idle or not.

BENCHMARKS.md, "Ray dispatch overhead", has what each adds to a step.

A rank that dies or raises fails the step with a `WorkerFailedError` naming
it: a raising rank first breaks its process group so the others leave their
collectives instead of waiting for it. The executor then stops every rank and
every later call raises the same error.

Importing this module imports Ray: the engine (engine/executors.py) does so
only when the config asks for Ray, so the in-process engine runs without it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.dag import InputNode, MultiOutputNode
from ray.exceptions import RayActorError

from pagedserve.config import TP_ACROSS_NODES, EngineConfig, ParallelConfig
from pagedserve.model.info import ModelInfo
from pagedserve.scheduler.step import StepInput, StepOutput
from pagedserve.worker.errors import WorkerFailedError
from pagedserve.worker.rank_weights import checkpoint_for_store
from pagedserve.worker.ray_utils import init_ray
from pagedserve.worker.ray_worker import RankFailure, Ranks, spawn_ranks
from pagedserve.worker.step_wire import EncodedStep, StepEncoder, unpack_output
from pagedserve.worker.worker import kv_block_bytes

logger = logging.getLogger(__name__)

POLL_S = 1.0  # how often a waiting step looks for failed ranks
FAILURE_GRACE_S = 2.0  # after one rank fails, how long the others get to report why


class RayExecutor:
    def __init__(self, info: ModelInfo, engine: EngineConfig, parallel: ParallelConfig,
                 load_format: str, ranks: Ranks | None = None) -> None:
        """`ranks`: rank actors already started for this engine (spawn_ranks), else
        they are started here."""
        init_ray()
        self.size = parallel.tensor_parallel_size
        self.timeout_s = parallel.step_timeout_s
        self.use_compiled_graph = parallel.use_compiled_graph(info.device.type)
        self._graph = None  # compiled at the first step: init calls go through plain calls
        self._steps = StepEncoder()  # what the ranks hold of the step before
        self.block_bytes = kv_block_bytes(info, engine, self.size)  # every rank's
        self._error: WorkerFailedError | None = None
        on_gpu = info.device.type == "cuda"
        if ranks is None:
            ranks = spawn_ranks(parallel, on_gpu)
        elif (ranks.on_gpu, len(ranks.workers)) != (on_gpu, self.size):
            ranks.shutdown()
            raise ValueError(f"{len(ranks.workers)} ranks started for "
                             f"{'GPUs' if ranks.on_gpu else 'CPUs'}; the engine needs "
                             f"{self.size} on {info.device.type}")
        self.ranks = ranks
        self.rank_nodes = self._call(self.workers, "node")  # (node id, address) per rank
        self._log_placement(parallel)
        init_method = self._call([self.workers[0]], "rendezvous_address")[0]
        stored = None
        if (info.weights_transfer == "object_store" and load_format != "dummy"
                and engine.simulator is None):  # a simulated accelerator loads nothing
            stored = [ray.put(checkpoint_for_store(info))]  # in a list: each rank gets it
        self.call_all("init_worker", info, engine, load_format, self.size, init_method,
                      self.timeout_s, parallel.worker_cpus, stored)
        del stored  # the store drops its copy once no rank holds the ref
        self.worker_pids = self.call_all("pid")
        self.weight_bytes = self._call([self.workers[0]], "weight_bytes")[0]
        logger.info("%d tensor-parallel workers ready (%s, rendezvous %s)", self.size,
                    info.device.type, init_method)

    def _log_placement(self, parallel: ParallelConfig) -> None:
        nodes = {node for node, _ in self.rank_nodes}
        if len(nodes) == 1:
            return
        ranks = ", ".join(f"rank {rank} on {address} ({node[:8]})"
                          for rank, (node, address) in enumerate(self.rank_nodes))
        logger.warning("the %d tensor-parallel ranks are spread over %d nodes (%s, %s): %s",
                       self.size, len(nodes), parallel.placement_strategy, ranks,
                       TP_ACROSS_NODES)

    @property
    def workers(self) -> list[Any]:
        """The ranks' actors, in rank order (none once shut down)."""
        return self.ranks.workers

    def num_available_blocks(self, max_num_batched_tokens: int) -> int:
        return min(self.call_all("num_available_blocks", max_num_batched_tokens))

    def init_kv_cache(self, num_blocks: int, num_cpu_blocks: int) -> None:
        self.call_all("init_kv_cache", num_blocks, num_cpu_blocks)

    def execute(self, step: StepInput) -> StepOutput:
        return self.submit(step).result()

    def submit(self, step: StepInput) -> _PendingStep:
        """Send a step to every rank; its result is waited for later. Each rank runs
        its calls in the order sent, so steps never overtake one another."""
        self._raise_if_failed()
        encoded = self._steps.encode(step)
        if self.use_compiled_graph:
            return _PendingStep(self, graph_ref=self._submit_compiled(encoded))
        # One serialization either way: inline for a single rank, else one
        # object in the store whose ref every rank reads.
        step_arg = encoded if self.size == 1 else ray.put(encoded)
        return _PendingStep(self, refs=[w.execute.remote(step_arg) for w in self.workers])

    def _result(self, pending: _PendingStep) -> StepOutput:
        self._raise_if_failed()
        if pending.graph_ref is not None:
            outputs = self._wait_compiled(pending.graph_ref)
        else:
            outputs = self._collect(pending.refs, "execute")
        failures = [output for output in outputs if isinstance(output, RankFailure)]
        if failures:
            first = min(failures, key=lambda failure: failure.at)
            self._fail(first.rank, f"execute ({first.error})")
        return unpack_output(outputs[0])

    def call_all(self, method: str, *args: Any) -> list[Any]:
        """Call `method` on every rank at once; results in rank order."""
        self._raise_if_failed()
        return self._call(self.workers, method, *args)

    def shutdown(self) -> None:
        if self._graph is not None:
            try:
                self._graph.teardown()
            except Exception:  # a dead rank's graph may already be torn down
                logger.debug("compiled graph teardown failed", exc_info=True)
            self._graph = None
        self.ranks.shutdown()

    # -- internals -----------------------------------------------------------
    def _submit_compiled(self, step: EncodedStep):
        if self._graph is None:
            with InputNode() as step_input:
                graph = MultiOutputNode([w.execute.bind(step_input) for w in self.workers])
            self._graph = graph.experimental_compile(_submit_timeout=self.timeout_s)
        try:
            return self._graph.execute(step)
        except Exception as error:  # noqa: BLE001 - a dead actor, a closed channel
            rank, detail = self._culprit(error)
            self._fail(rank, f"execute ({detail})", error)

    def _wait_compiled(self, ref) -> list[Any]:
        try:
            return ray.get(ref, timeout=self.timeout_s)
        except Exception as error:  # noqa: BLE001 - a dead actor, a closed channel, a timeout
            # A rank's death often reaches the driver first as the graph's
            # channel closing: ask the actors which one is gone before blaming none.
            rank, detail = self._culprit(error)
            self._fail(rank, f"execute ({detail})", error)

    def _culprit(self, error: BaseException) -> tuple[int | None, str]:
        """The rank to blame for a failed graph step, and why.

        The actor the error names, else the ranks are asked at once: one whose
        actor is reported dead is blamed over one that only fails to answer
        within FAILURE_GRACE_S. When all answer, no rank is blamed.
        """
        ranks = {worker._actor_id.hex(): rank for rank, worker in enumerate(self.workers)}
        if getattr(error, "actor_id", None) in ranks:
            return ranks[error.actor_id], "its actor died"
        probes = [worker.__ray_ready__.remote() for worker in self.workers]
        ready, _ = ray.wait(probes, num_returns=len(probes), timeout=FAILURE_GRACE_S)
        dead, silent = [], []
        for rank, probe in enumerate(probes):
            if probe not in ready:
                silent.append(rank)
                continue
            try:
                ray.get(probe)
            except RayActorError:
                dead.append(rank)
            except Exception:  # noqa: BLE001 - any other failure to answer
                silent.append(rank)
        if dead:
            return dead[0], "its actor died"
        if silent:
            return silent[0], f"no answer after {_summary(error)}"
        return None, _summary(error)

    def _call(self, workers: list, method: str, *args: Any) -> list[Any]:
        return self._collect([getattr(w, method).remote(*args) for w in workers], method)

    def _collect(self, refs: list, what: str) -> list[Any]:
        """Wait for one call on each rank; the first rank to fail fails the call.

        Ranks are polled together: when one dies, the others block in a
        collective, so waiting on them in order could hang.
        """
        try:
            return ray.get(refs, timeout=POLL_S)  # the common case: every rank answers at once
        except Exception:  # noqa: BLE001 - slow or failed: find out which, below
            pass
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        deadline = time.monotonic() + self.timeout_s
        while pending:
            timeout = min(POLL_S, max(0.0, deadline - time.monotonic()))
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=timeout)
            failures = {}
            for ref in ready:
                try:
                    results[rank_of[ref]] = ray.get(ref)
                except Exception as error:  # noqa: BLE001 - any failure ends the engine
                    failures[rank_of[ref]] = error
            if failures:
                self._fail_call(what, failures, pending, rank_of)
            if pending and time.monotonic() >= deadline:
                self._fail(rank_of[pending[0]],
                           f"{what} (no reply within step_timeout_s={self.timeout_s:g})")
        return results

    def _fail_call(self, what: str, failures: dict[int, Exception], pending: list,
                   rank_of: dict) -> None:
        """A plain call failed on some ranks: name the one that caused it.

        When one rank dies, the others soon fail too (a collective loses its
        peer), sometimes before the death is reported: give the rest a moment
        and blame a dead actor over an error that followed from it.
        """
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=FAILURE_GRACE_S)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as error:  # noqa: BLE001 - every failure counts; a dead actor first
                failures[rank_of[ref]] = error
        dead = [rank for rank, error in failures.items() if isinstance(error, RayActorError)]
        rank = min(dead or failures)
        kind = "its actor died" if rank in dead else _summary(failures[rank])
        self._fail(rank, f"{what} ({kind})", failures[rank])

    def _fail(self, rank: int | None, detail: str, cause: BaseException | None = None) -> None:
        self._error = WorkerFailedError(rank, detail)
        logger.error("%s; shutting down all %d workers", self._error, self.size)
        self.shutdown()
        raise self._error from cause

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


class _PendingStep:
    """A step sent to the ranks: its refs (plain calls) or its compiled graph's ref."""

    def __init__(self, executor: RayExecutor, refs: list | None = None,
                 graph_ref: Any = None) -> None:
        self.executor, self.refs, self.graph_ref = executor, refs, graph_ref

    def result(self) -> StepOutput:
        return self.executor._result(self)


def _summary(error: BaseException) -> str:
    """`Type: first line` of an error, unwrapping Ray's task error to the worker's own."""
    cause = getattr(error, "cause", None) or error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
