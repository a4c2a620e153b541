"""Cumulative outputs turned into deltas: per choice, only what is new.

The engine makes cumulative `RequestOutput`s: each says everything so far, so
a consumer that lags can take the newest and skip the rest. A delta is cut
from the newest one against what was already handed out.

The text of a choice can shrink once: a stop string is cut off when it
completes. So, with stop strings, the last `max(len(stop)) - 1` characters
are held back until more text comes or the choice finishes; the text handed
out is then always a prefix of the final text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from pagedserve.outputs import RequestOutput


@dataclass
class _Sent:
    text: int = 0
    tokens: int = 0
    logprobs: int = 0
    finished: bool = False


class DeltaTracker:
    """What one request has handed out, per choice index."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self.hold_back = max((len(s) for s in stop), default=1) - 1
        self._sent: dict[int, _Sent] = {}
        self._prompt_logprobs_sent = False

    def delta(self, output: RequestOutput) -> RequestOutput:
        """`output` (cumulative) less what was handed out; choices with no news are left
        out, and a finished choice appears once, with its finish reason."""
        choices = []
        for choice in sorted(output.outputs, key=lambda c: c.index):
            sent = self._sent.setdefault(choice.index, _Sent())
            if sent.finished:
                continue
            end = len(choice.text) if choice.finished else len(choice.text) - self.hold_back
            text = choice.text[sent.text:end] if end > sent.text else ""
            logprobs = None if choice.logprobs is None else choice.logprobs[sent.logprobs:]
            news = dataclasses.replace(choice, text=text, token_ids=choice.token_ids[sent.tokens:],
                                       logprobs=logprobs)
            sent.text += len(text)
            sent.tokens = len(choice.token_ids)
            sent.logprobs = len(choice.logprobs or ())
            sent.finished = choice.finished
            if text or news.token_ids or logprobs or choice.finished:
                choices.append(news)
        prompt_logprobs = None
        if output.prompt_logprobs is not None and not self._prompt_logprobs_sent:
            prompt_logprobs, self._prompt_logprobs_sent = output.prompt_logprobs, True
        return dataclasses.replace(output, outputs=choices, prompt_logprobs=prompt_logprobs)
