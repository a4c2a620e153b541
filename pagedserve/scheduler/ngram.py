"""Prompt lookup: speculated tokens from a sequence's own tokens, with no draft model.

    tokens:  ... a b c d e ... x a b c   <- the last n tokens (the pattern)
                     └──┘ proposed: what followed the pattern's latest earlier match

The longest pattern from `max_n` down to `min_n` tokens that occurs earlier in
the sequence (prompt and output alike) wins, and its most recent earlier
occurrence: a summary, an edited file or an answer drawn from a document copies
its source in order, and the latest match is the one the output is walking
along. What followed it, up to `k` tokens, is proposed (vLLM's
`prompt_lookup_min`/`prompt_lookup_max`/`num_speculative_tokens`).
"""

from __future__ import annotations

import dataclasses
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from pagedserve.scheduler.sequence import Sequence

# Tokens as 4-byte words, so that a pattern is found by bytes.rfind (a C loop).
_WORD = array("i").itemsize


def propose(token_ids: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the longest suffix
    of `token_ids` of `min_n` to `max_n` tokens; [] where none occurs."""
    return _lookup(array("i", token_ids).tobytes(), token_ids, k, min_n, max_n)


def _lookup(words: bytes | bytearray, token_ids: list[int], k: int, min_n: int,
            max_n: int) -> list[int]:
    """propose, with `words` the tokens as 4-byte words."""
    length = len(token_ids)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        pattern = words[(length - n) * _WORD:]
        # An occurrence that starts before the suffix itself leaves a token after it.
        end = (length - 1) * _WORD
        while (found := words.rfind(pattern, 0, end)) >= 0:
            if found % _WORD == 0:  # a match on token boundaries
                follow = found // _WORD + n
                return token_ids[follow:follow + k]
            end = found + len(pattern) - 1  # straddles tokens: look earlier
    return []


@dataclass(frozen=True)
class PromptLookup:
    """The scheduler's proposer: up to `k` tokens for a sequence's next step."""

    k: int
    min_n: int
    max_n: int
    lookahead: ClassVar[int] = 0  # it proposes on the host, before the step

    def shortened(self, k: int) -> PromptLookup:
        """This proposer, proposing at most `k` tokens."""
        return self if k == self.k else dataclasses.replace(self, k=k)

    def draft(self, seq: Sequence, room: int) -> list[int]:
        """Speculated tokens for `seq`, at most `room` of them (what its step budget,
        max_tokens and the context leave after the one it samples). The sequence keeps
        its tokens as words (`proposer_state`), extended by the tokens new since."""
        if room <= 0:
            return []
        words = seq.proposer_state
        if words is None:
            words = seq.proposer_state = bytearray()
        known = len(words) // _WORD
        if known < seq.num_tokens:
            words += array("i", seq.token_ids[known:]).tobytes()
        return _lookup(words, seq.token_ids, min(self.k, room), self.min_n, self.max_n)
