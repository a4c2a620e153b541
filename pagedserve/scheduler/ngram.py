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

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose(token_ids: list[int] | np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the longest suffix
    of `token_ids` of `min_n` to `max_n` tokens; [] where none occurs."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        pattern = tokens[length - n:]
        # Windows that start before the suffix itself and leave a token after them.
        windows = sliding_window_view(tokens[:length - 1], n)
        starts = np.flatnonzero((windows == pattern).all(axis=1))
        if len(starts):
            follow = starts[-1] + n
            return tokens[follow:follow + k].tolist()
    return []
