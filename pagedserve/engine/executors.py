"""Which executor runs the workers, and on which device.

In-process (`LocalExecutor`, no Ray) or one Ray actor per rank
(`RayExecutor`). Ray is imported, and joined, only when the config asks for
it; then the cluster's resources choose the device, since the workers may
sit on other nodes.
"""

from __future__ import annotations

import torch

from pagedserve.config import EngineConfig, ParallelConfig
from pagedserve.worker.executor import Executor, LocalExecutor
from pagedserve.worker.model_info import ModelInfo


def choose_device(engine: EngineConfig, parallel: ParallelConfig) -> torch.device:
    if engine.simulator is not None:
        return torch.device("cpu")  # the simulated GPU's workers hold host objects only
    if parallel.executor_backend == "ray":
        from pagedserve.worker.ray_utils import cluster_device  # Ray only when asked for

        return cluster_device(engine.device)
    if engine.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if engine.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("engine.device='cuda' but torch sees no CUDA device")
    return torch.device(engine.device)


def make_executor(info: ModelInfo, engine: EngineConfig, parallel: ParallelConfig,
                  load_format: str) -> Executor:
    if parallel.executor_backend == "local":
        return LocalExecutor(info, engine, load_format)
    from pagedserve.worker.ray_executor import RayExecutor  # Ray only when asked for

    return RayExecutor(info, engine, parallel, load_format)
