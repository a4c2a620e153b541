"""The tensor-parallel ranks as Ray actors: `RayWorker`, and `spawn_ranks`, which places
and starts them.

A rank's process spends seconds importing torch and the model code before it
can do anything. This module imports only Ray, so a Serve replica starts its
ranks first thing (cluster/server.py), and the ranks import the model stack
while the replica imports the engine, not after it: on 2 cores a replica is
ready about 3 s sooner. `RayWorker.__init__` imports that stack as the process
starts; its methods import from it again, at no cost.

RayExecutor (worker/ray_executor.py) drives the ranks a spawn_ranks returns,
or spawns its own.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pagedserve.config import EngineConfig, ParallelConfig
from pagedserve.worker.ray_utils import check_cluster_fits, init_ray, node_here, normal_priority

if TYPE_CHECKING:
    from pagedserve.model.info import ModelInfo
    from pagedserve.worker.step_wire import EncodedStep, PackedOutput
    from pagedserve.worker.worker import Worker

logger = logging.getLogger(__name__)

# What a rank computes with: imported as its process starts.
RANK_STACK = ("pagedserve.worker.worker", "pagedserve.worker.distributed",
              "pagedserve.worker.rank_weights", "pagedserve.worker.cpu_threads")


@dataclass(frozen=True)
class RankFailure:
    """What a rank returns instead of raising, so the driver sees every rank's story."""

    rank: int
    error: str
    at: float  # time.time() when it failed: the earliest failure is the cause


class RayWorker:
    """One tensor-parallel rank: a Worker inside its own actor process."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.worker: Worker | None = None
        normal_priority(f"tensor-parallel rank {rank}")
        for module in RANK_STACK:
            importlib.import_module(module)
        from pagedserve.worker.step_wire import StepDecoder, pack_output

        # Steps come in as what changed, outputs go back as tuples (worker/step_wire.py).
        self.steps, self.pack_output = StepDecoder(), pack_output

    def rendezvous_address(self) -> str:
        """A free TCP port on this node, for the process group's store (rank 0 only)."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def node(self) -> tuple[str, str]:
        """(node id, node address) of the node this rank runs on."""
        return node_here()

    def init_worker(self, info: ModelInfo, engine: EngineConfig, load_format: str, size: int,
                    init_method: str, timeout_s: float, reserved_cpus: float,
                    stored: list | None = None) -> None:
        """`stored`: [the object-store ref of the checkpoint] (weights_transfer
        object_store), else None: the rank reads the files on its node."""
        import torch

        from pagedserve.worker import cpu_threads
        from pagedserve.worker.distributed import TPGroup, init_tp_group
        from pagedserve.worker.rank_weights import model_files_here, stored_checkpoint
        from pagedserve.worker.worker import make_worker

        checkpoint = stored_checkpoint(ray.get(stored[0])) if stored else None
        if load_format != "dummy" and checkpoint is None:
            info = model_files_here(info, self.rank)
        if engine.simulator is not None:  # no collectives: every rank sleeps the same step
            self.worker = make_worker(info, engine, load_format, TPGroup(self.rank, size))
            return
        backend = "nccl" if info.device.type == "cuda" else "gloo"
        if info.device.type == "cuda":
            torch.cuda.set_device(0)  # Ray exposes exactly this actor's GPU
        else:
            cpu_threads.apply(engine.cpu_threads, reserved_cpus)
        tp = init_tp_group(self.rank, size, init_method, backend, timeout_s)
        self.worker = make_worker(info, engine, load_format, tp, checkpoint)

    def num_available_blocks(self, max_num_batched_tokens: int) -> int:
        return self.worker.num_available_blocks(max_num_batched_tokens)

    def init_kv_cache(self, num_blocks: int, num_cpu_blocks: int) -> None:
        self.worker.init_kv_cache(num_blocks, num_cpu_blocks)

    def pid(self) -> int:
        return os.getpid()

    def weight_bytes(self) -> int:
        return self.worker.weight_bytes

    def execute(self, step: EncodedStep) -> PackedOutput | RankFailure | None:
        try:
            return self.pack_output(self.worker.execute(self.steps.decode(step)))
        except Exception as error:  # reported to the driver, which stops all ranks
            import torch.distributed as dist

            failed_at = time.time()
            logger.exception("rank %d failed in execute", self.rank)
            if dist.is_initialized():
                dist.destroy_process_group()  # peers waiting in a collective fail now
            return RankFailure(self.rank, f"{type(error).__name__}: {error}", failed_at)


@dataclass
class Ranks:
    """Rank actors started by spawn_ranks, in rank order, and where they are placed."""

    workers: list[Any]  # RayWorker actor handles
    on_gpu: bool
    placement_group: PlacementGroup | None
    owns_group: bool  # placed by spawn_ranks, so removed with the ranks

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []
        if self.placement_group is not None and self.owns_group:
            remove_placement_group(self.placement_group)
        self.placement_group = None


def spawn_ranks(parallel: ParallelConfig, on_gpu: bool) -> Ranks:
    """Start one RayWorker per rank; they come up (and import) while the caller goes on.

    Inside a Serve replica gang-placed with its ranks (cluster/app.py), the
    replica holds bundle 0 of its placement group and the ranks take the rest;
    otherwise the ranks get a placement group of their own.
    """
    init_ray()
    size = parallel.tensor_parallel_size
    current = get_current_placement_group()
    if current is not None and len(current.bundle_specs) == size + 1:
        group, first_bundle, owns_group = current, 1, False
    else:
        group, first_bundle, owns_group = _place(on_gpu, parallel), 0, True
    actor_class = ray.remote(RayWorker)
    workers = [
        actor_class.options(
            num_cpus=0 if on_gpu else parallel.worker_cpus, num_gpus=1 if on_gpu else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=first_bundle + rank),
        ).remote(rank)
        for rank in range(size)
    ]
    return Ranks(workers, on_gpu, group, owns_group)


def _place(on_gpu: bool, parallel: ParallelConfig) -> PlacementGroup:
    size = parallel.tensor_parallel_size
    bundle = {"GPU": 1} if on_gpu else {"CPU": parallel.worker_cpus}
    check_cluster_fits(bundle, size)
    group = placement_group([bundle] * size, strategy=parallel.placement_strategy)
    if not group.wait(timeout_seconds=parallel.placement_timeout_s):
        remove_placement_group(group)
        raise RuntimeError(
            f"could not place {size} tensor-parallel workers with {bundle} each "
            f"({parallel.placement_strategy}) within {parallel.placement_timeout_s:.0f} s; "
            f"the cluster has {ray.available_resources()} available")
    return group
