"""Speculative decoding's proposers, as the scheduler sees them.

A proposer gives a decoding sequence's draft tokens for its next step:

- `PromptLookup` (ngram.py) finds them on the host, in the sequence's own tokens.
- `ModelDrafts` hands on what a draft model proposed on the worker after the
  sequence's last step (worker/draft.py). The draft model writes its KV for
  the tokens it proposes from into `lookahead` slots past the step's tokens,
  which the scheduler reserves with the step and takes back after it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

from pagedserve.scheduler.sequence import Sequence


class Proposer(Protocol):
    @property
    def k(self) -> int: ...  # the most tokens it proposes

    @property
    def lookahead(self) -> int: ...  # slots a step reserves past its tokens for it

    def shortened(self, k: int) -> Proposer: ...

    def draft(self, seq: Sequence, room: int) -> list[int]: ...


@dataclass(frozen=True)
class ModelDrafts:
    """A draft model's proposals: up to `k` tokens, made on the worker."""

    k: int

    @property
    def lookahead(self) -> int:
        return self.k

    def shortened(self, k: int) -> ModelDrafts:
        return self if k == self.k else dataclasses.replace(self, k=k)

    def draft(self, seq: Sequence, room: int) -> list[int]:
        """The tokens proposed after the sequence's newest one, at most `room` (and this
        proposer's `k`); none where the last step proposed nothing for it, or proposed
        them for an earlier length (the sequence decoded plainly since)."""
        state = seq.proposer_state
        if room <= 0 or state is None or state[0] != seq.num_tokens:
            return []
        return state[1][:min(room, self.k)]


def keep_proposals(seq: Sequence, proposals: list[int] | None) -> None:
    """Hold a draft model's proposals for the sequence's next step."""
    if proposals:
        seq.proposer_state = (seq.num_tokens, proposals)
