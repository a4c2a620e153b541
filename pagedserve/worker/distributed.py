"""The tensor-parallel group of one worker: its rank, the group size, and the
two collectives the model needs.

Every tensor-parallel layer takes a `TPGroup`. With size 1 the collectives are
no-ops, so the same model code runs in-process (LocalExecutor) and across Ray
actors (RayExecutor). A group with no process group attached (`group=None`,
size > 1) still knows which shard it holds: that is how a rank's weights can be
built and checked without starting torch.distributed.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank={self.rank} is outside a tensor-parallel group "
                             f"of size {self.size}")

    def split(self, total: int, what: str) -> int:
        """This rank's part of `total`, which must divide evenly."""
        if total % self.size:
            raise ValueError(f"{what}={total} is not divisible by tensor_parallel_size={self.size}")
        return total // self.size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor on every rank, in place."""
        if self.size > 1:
            dist.broadcast(tensor, src=0, group=self.group)
        return tensor

    def gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """Concatenate every rank's tensor along the last dim on rank 0; None elsewhere."""
        if self.size == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(tensor, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=-1) if parts is not None else None


def init_tp_group(rank: int, size: int, init_method: str, backend: str,
                  timeout_s: float) -> TPGroup:
    """Join the process group of `size` workers (one per rank) and return this rank's TPGroup.

    A collective that waits longer than `timeout_s` (a peer died) raises instead
    of hanging.
    """
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return TPGroup(rank, size, dist.group.WORLD)
