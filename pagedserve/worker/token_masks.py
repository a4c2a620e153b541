"""Token bitmasks applied to logits on the device: a structured output's grammar says,
for each constrained row, which tokens may come next (engine/grammar.py fills the
masks on the host).

A mask row is int32 words, 32 vocabulary entries each: bit j of word w allows
token 32 w + j (xgrammar's layout). Disallowed tokens' logits become -inf, so
greedy, sampling and logprobs all see only what the grammar allows. Rows without
a grammar are not touched, and a step without one costs nothing.

With async scheduling a step is sent while the one before still runs, before
its sequences' previous tokens are known, and so before their grammars can say
what comes next. Such a step carries a `PendingBitmask`: the engine fills it
once the step before is taken in, while this step's forward runs, and the
sampler waits for it (vLLM's split of the forward from the sampling).
"""

from __future__ import annotations

import threading
import time

import torch

BITS_PER_WORD = 32


# Each bit of an int32 word on its own (bit 31 is the sign bit).
_BITS = [1 << j for j in range(BITS_PER_WORD - 1)] + [-(1 << (BITS_PER_WORD - 1))]


class MaskCancelled(RuntimeError):
    """The engine stopped before it filled a step's bitmask."""


class PendingBitmask:
    """A step's bitmask, filled by the engine after the step was sent."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor  # [rows, words] on the host, all allowed until filled
        self.ready_at: float | None = None  # time.perf_counter() when it was filled
        self._ready = threading.Event()
        self._cancelled = False

    def set_ready(self) -> None:
        self.ready_at = time.perf_counter()
        self._ready.set()

    def cancel(self) -> None:
        """Release a sampler that waits for a mask that will never come."""
        if not self._ready.is_set():
            self._cancelled = True
            self._ready.set()

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set() and not self._cancelled

    def wait(self) -> torch.Tensor:
        self._ready.wait()
        if self._cancelled:
            raise MaskCancelled("the engine stopped before it filled this step's mask")
        return self.tensor


def resolved(bitmask: torch.Tensor | PendingBitmask | None) -> torch.Tensor | None:
    """A step's bitmask, waited for if the engine fills it late."""
    return bitmask.wait() if isinstance(bitmask, PendingBitmask) else bitmask


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, words] int32 -> [rows, vocab_size] bool, on the bitmask's device. (An AND
    with each bit and a compare: on the CPU a tenth of the time of shifting each word
    32 ways.)"""
    bits = torch.tensor(_BITS, dtype=torch.int32, device=bitmask.device)
    return (bitmask.unsqueeze(-1) & bits).ne(0).flatten(1)[:, :vocab_size]


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor,
                         rows: torch.Tensor | None = None) -> torch.Tensor:
    """Set to -inf the logits of tokens the bitmask disallows, in place.

    logits: [N, V]; bitmask: [R, ceil(V' / 32)] int32 on any device, where V' may
    exceed V (a padded vocabulary: the extra bits are ignored) or fall short of it
    (tokens past V' are disallowed: no grammar can produce them); rows: [R] indices
    of the logits rows the mask rows apply to (None: R equals N, row for row).
    """
    vocab = logits.shape[1]
    allowed = allowed_tokens(bitmask.to(logits.device, non_blocking=True), vocab)
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    if rows is None:
        logits.masked_fill_(~allowed, float("-inf"))
    else:
        rows = rows.to(logits.device)
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    return logits
