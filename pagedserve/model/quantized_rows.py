"""A weight-only quantized weight, or rows of one, as a checkpoint gives it:

    W[n, k] = q[n, k] * scales[n, k // group] + offsets[n, k // group]

q holds integers of `bits` bits (0..15 for 4, -128..127 for 8) or float8_e4m3fn
values (bits 8), scales and offsets are float32, and offsets may be absent
(zero). This is every weight-only format the loader keeps quantized: GGUF's Q4_0
(offset -8 d), Q4_1 (offset m) and Q8_0 (none); zero-point formats (AWQ, GPTQ,
compressed-tensors) as offset -z s; FP8 with one group per channel or per block
(model/quantized_checkpoint.py). The worker packs it for its kernel
(worker/layers/quantized.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class QuantizedRows:
    q: torch.Tensor  # [n, k]: uint8 (4 bits), int8 (8 bits) or float8_e4m3fn
    scales: torch.Tensor  # [n, k // group] float32
    offsets: torch.Tensor | None  # like scales, or None for zero
    bits: int
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    @property
    def fmt(self) -> str:
        """The kernels' name for how q is held: int4, int8 or fp8_e4m3."""
        return "fp8_e4m3" if self.q.dtype == torch.float8_e4m3fn else f"int{self.bits}"

    def select(self, rows: slice, cols: slice) -> QuantizedRows:
        """Rows and columns of the weight. Columns start and end on groups, or lie inside
        one group (which then becomes a group of their own: the same scale applies)."""
        n, k = self.shape
        first, last, _ = cols.indices(k)
        group = self.group
        if first // group == (last - 1) // group:
            group = last - first
        elif first % group or (last % group and last != k):
            raise ValueError(f"columns {first}..{last} cut a group of {group}")
        start, stop, _ = rows.indices(n)

        def part(values: torch.Tensor) -> torch.Tensor:
            return values[start:stop, first // self.group:-(-last // self.group)].contiguous()

        return QuantizedRows(self.q[start:stop, first:last].contiguous(), part(self.scales),
                             None if self.offsets is None else part(self.offsets),
                             self.bits, group)

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
        smallest group, offsets where any part has them. Float8 parts join only float8
        parts (a ValueError says so)."""
        if len({part.fmt == "fp8_e4m3" for part in parts}) > 1:
            raise ValueError("float8 and integer parts cannot be held as one weight")
        bits = max(part.bits for part in parts)
        group = min(part.group for part in parts)
        parts = [part.with_group(group) for part in parts]
        any_offsets = any(part.offsets is not None for part in parts)
        offsets = None
        if any_offsets:
            offsets = torch.cat([part.offsets if part.offsets is not None
                                 else torch.zeros_like(part.scales) for part in parts])
        if parts[0].fmt == "fp8_e4m3":
            q = torch.cat([part.q.view(torch.uint8) for part in parts]).view(torch.float8_e4m3fn)
        else:
            q = torch.cat([part.q.to(torch.int8 if bits == 8 else torch.uint8) for part in parts])
        return QuantizedRows(q, torch.cat([part.scales for part in parts]), offsets, bits, group)
