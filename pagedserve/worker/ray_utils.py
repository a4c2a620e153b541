"""Ray for the engine's processes: joining the cluster, priority, what it can hold,
and where a process runs.

One module for the Ray process helpers the executor, the engine and the
Serve replica share. It imports Ray and nothing heavier (no torch), so the
replica can start its ranks before it imports the engine (worker/ray_worker.py).
"""

from __future__ import annotations

import logging
import os

import ray

from pagedserve.config import EngineConfig

logger = logging.getLogger(__name__)


def init_ray() -> None:
    """Join the Ray cluster (RAY_ADDRESS, or a new local one) unless already connected."""
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)


def normal_priority(who: str) -> None:
    """Undo Ray's niceness 15 for a process on the engine's critical path.

    Ray starts worker processes at niceness 15 so its own daemons stay
    responsive. The engine's step loop and its ranks are what every request
    waits for (each step waits for the slowest rank), so they ask for normal
    priority; that needs CAP_SYS_NICE, and without it they stay niced.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:
        logger.warning("%s keeps niceness %d (no permission to raise its priority)", who,
                       os.getpriority(os.PRIO_PROCESS, 0))


def check_cluster_fits(bundle: dict[str, float], size: int) -> None:
    """Fail at once when the whole cluster could never hold the ranks (as vLLM does)."""
    total = ray.cluster_resources()
    for resource, amount in bundle.items():
        if amount * size > total.get(resource, 0):
            setting = "worker_cpus" if resource == "CPU" else "tensor_parallel_size"
            raise ValueError(
                f"parallel.tensor_parallel_size={size} needs {amount * size:g} {resource} "
                f"({amount:g} per rank) but the Ray cluster has {total.get(resource, 0):g}: "
                f"lower parallel.{setting} or add nodes")


def ranks_device_type(engine: EngineConfig) -> str:
    """The device type of Ray workers, which may sit on other nodes: the cluster's
    resources decide for "auto", not this process's view (joining the cluster). A
    simulated GPU's workers only sleep, on CPUs."""
    if engine.simulator is not None:
        return "cpu"
    if engine.device != "auto":
        return engine.device
    init_ray()
    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def node_here() -> tuple[str, str]:
    """(Ray node id, node address) of the node this process runs on."""
    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
