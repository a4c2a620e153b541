"""Host -> device copies that do not make the host wait.

On CUDA a copy from pageable memory is staged and synchronous for the host;
from pinned memory with `non_blocking=True` it is queued on the stream like a
kernel, so the host goes on building the rest of the step while it runs.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; through pinned memory on CUDA, queued without a sync."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)

