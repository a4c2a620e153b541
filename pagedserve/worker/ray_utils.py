"""Ray for the engine's processes: joining the cluster, priority, and what it can hold.

One module for the Ray process helpers the executor, the engine and the
Serve replica share; it imports nothing of pagedserve's above the worker.
"""

from __future__ import annotations

import logging
import os

import ray
import torch

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


def cluster_device(name: str) -> torch.device:
    """The device of Ray workers, which may sit on other nodes: the cluster's
    resources decide for "auto", not this process's view. Joins the cluster."""
    if name != "auto":
        return torch.device(name)
    init_ray()
    return torch.device("cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu")
