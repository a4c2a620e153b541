"""What the tests share: the repository's root, and helpers for the scheduler, the block
manager, the sampler and the attention kernels (one module each)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
