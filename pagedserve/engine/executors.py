"""Which executor runs the workers, on which device, in which dtype.

In-process (`LocalExecutor`, no Ray) or one Ray actor per rank
(`RayExecutor`). Ray is imported, and joined, only when the config asks for
it; then the cluster's resources choose the device, since the workers may
sit on other nodes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from pagedserve.config import EngineConfig, ParallelConfig
from pagedserve.model.info import ModelInfo
from pagedserve.worker.executor import Executor, LocalExecutor
from pagedserve.worker.layers.linear import cpu_float16_supported

if TYPE_CHECKING:
    from pagedserve.worker.ray_worker import Ranks

logger = logging.getLogger(__name__)


def choose_device(engine: EngineConfig, parallel: ParallelConfig) -> torch.device:
    if parallel.executor_backend == "ray":
        from pagedserve.worker.ray_utils import ranks_device_type  # Ray only when asked for

        return torch.device(ranks_device_type(engine))
    if engine.simulator is not None:
        return torch.device("cpu")  # the simulated GPU's workers hold host objects only
    if engine.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if engine.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("engine.device='cuda' but torch sees no CUDA device")
    return torch.device(engine.device)


def choose_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """An asked-for float16 on a CPU without native float16 matmuls (avx512_fp16 or
    avx_ne_convert) runs in bfloat16, which has float16's size and more range."""
    if dtype != torch.float16 or device.type != "cpu" or cpu_float16_supported():
        return dtype
    logger.warning("dtype float16: this CPU has no native float16 matmul (avx512_fp16 or "
                   "avx_ne_convert); serving in bfloat16 instead")
    return torch.bfloat16


def make_executor(info: ModelInfo, engine: EngineConfig, parallel: ParallelConfig,
                  load_format: str, ranks: Ranks | None = None) -> Executor:
    """`ranks`: Ray rank actors already started for this engine (worker/ray_worker.py)."""
    if parallel.executor_backend == "local":
        if ranks is not None:
            raise ValueError("ranks were started, but parallel.distributed_executor_backend "
                             "is 'local': the model runs in this process")
        return LocalExecutor(info, engine, load_format)
    from pagedserve.worker.ray_executor import RayExecutor  # Ray only when asked for

    return RayExecutor(info, engine, parallel, load_format, ranks)
