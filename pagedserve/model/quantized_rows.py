"""A weight-only quantized weight, or rows of one, as a checkpoint gives it:

    W[n, k] = q[n, k] * scales[n, k // group] + offsets[n, k // group]

q holds integers of `bits` bits (0..15 for 4, -128..127 for 8), scales and offsets
are float32, and offsets may be absent (zero). This is every weight-only format
the loader keeps quantized: GGUF's Q4_0 (offset -8 d), Q4_1 (offset m) and Q8_0
(none); zero-point formats fit it as offset -z s. The worker packs it for its
kernel (worker/layers/quantized.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class QuantizedRows:
    q: torch.Tensor  # [n, k] integers: uint8 (4 bits) or int8 (8 bits)
    scales: torch.Tensor  # [n, k // group] float32
    offsets: torch.Tensor | None  # like scales, or None for zero
    bits: int
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [n, k]."""
        weight = self.q.float() * self.scales.repeat_interleave(self.group, dim=1)
        if self.offsets is not None:
            weight += self.offsets.repeat_interleave(self.group, dim=1)
        return weight

    def with_group(self, group: int) -> QuantizedRows:
        """The same weight with groups of `group` (a divisor of this group): each scale
        and offset repeated."""
        if self.group % group:
            raise ValueError(f"a group of {self.group} cannot be split into groups of {group}")
        repeat = self.group // group
        return QuantizedRows(self.q, self.scales.repeat_interleave(repeat, dim=1),
                             None if self.offsets is None
                             else self.offsets.repeat_interleave(repeat, dim=1),
                             self.bits, group)

    @staticmethod
    def cat(parts: Sequence[QuantizedRows]) -> QuantizedRows:
        """Parts stacked by rows (a fused q/k/v or gate/up weight): the widest bits, the
        smallest group, offsets where any part has them."""
        bits = max(part.bits for part in parts)
        group = min(part.group for part in parts)
        parts = [part.with_group(group) for part in parts]
        any_offsets = any(part.offsets is not None for part in parts)
        offsets = None
        if any_offsets:
            offsets = torch.cat([part.offsets if part.offsets is not None
                                 else torch.zeros_like(part.scales) for part in parts])
        q = torch.cat([part.q.to(torch.int8 if bits == 8 else torch.uint8) for part in parts])
        return QuantizedRows(q, torch.cat([part.scales for part in parts]), offsets, bits, group)
