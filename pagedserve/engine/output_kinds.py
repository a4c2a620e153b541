"""Outputs as deltas: per choice, only what is new since the last output.

A cumulative `RequestOutput` says everything so far; a delta only what the
consumer has not had: the new text, token ids and logprob entries of each
choice, and its finish reason once. `DeltaTracker` cuts them, from the
engine's sequences directly (EngineCore, for DELTA requests, so no cumulative
output is built) or from cumulative outputs. `merge` joins two deltas, for a
consumer that lags a step behind; `Accumulator` adds deltas up again into the
cumulative output (the ingress, for whole responses and usage).

The text of a choice can shrink once: a stop string is cut off when it
completes. So, with stop strings, the last `max(len(stop)) - 1` characters
are held back until more text comes or the choice finishes; the text handed
out is then always a prefix of the final text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from pagedserve.outputs import CompletionOutput, RequestOutput


@dataclass(slots=True)
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

    def news(self, index: int, text: str, tokens: Sequence[int], token_start: int,
             logprobs: list[dict[int, float]] | None, finish_reason: str | None,
             stop_reason: int | str | None, cumulative_logprob: float | None
             ) -> CompletionOutput | None:
        """Choice `index`'s news; `tokens[token_start:]` are its token ids so far (a
        sequence's own list, sliced only past what was sent). None: nothing new."""
        sent = self._sent.get(index)
        if sent is None:
            sent = self._sent[index] = _Sent()
        if sent.finished:
            return None
        finished = finish_reason is not None
        end = len(text) if finished else len(text) - self.hold_back
        new_text = text[sent.text:end] if end > sent.text else ""
        new_tokens = tokens[token_start + sent.tokens:]
        new_logprobs = None if logprobs is None else logprobs[sent.logprobs:]
        sent.text += len(new_text)
        sent.tokens += len(new_tokens)
        sent.logprobs += len(new_logprobs or ())
        sent.finished = finished
        if not (new_text or new_tokens or new_logprobs or finished):
            return None
        return CompletionOutput(index, new_text, list(new_tokens), cumulative_logprob,
                                new_logprobs, finish_reason, stop_reason)

    def prompt_logprobs(self, scores: list | None) -> list | None:
        """The prompt's logprobs, handed out once."""
        if scores is None or self._prompt_logprobs_sent:
            return None
        self._prompt_logprobs_sent = True
        return scores

    def delta(self, output: RequestOutput) -> RequestOutput:
        """`output` (cumulative) less what was handed out; choices with no news are left
        out, and a finished choice appears once, with its finish reason."""
        choices = []
        for choice in sorted(output.outputs, key=lambda c: c.index):
            news = self.news(choice.index, choice.text, choice.token_ids, 0, choice.logprobs,
                             choice.finish_reason, choice.stop_reason,
                             choice.cumulative_logprob)
            if news is not None:
                choices.append(news)
        return dataclasses.replace(output, outputs=choices,
                                   prompt_logprobs=self.prompt_logprobs(output.prompt_logprobs))


def merge(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """One delta saying what two consecutive deltas of a request say."""
    choices = {choice.index: choice for choice in first.outputs}
    for news in then.outputs:
        old = choices.get(news.index)
        if old is None:
            choices[news.index] = news
            continue
        logprobs = (None if old.logprobs is None and news.logprobs is None
                    else (old.logprobs or []) + (news.logprobs or []))
        choices[news.index] = CompletionOutput(
            news.index, old.text + news.text, old.token_ids + news.token_ids,
            news.cumulative_logprob, logprobs, news.finish_reason, news.stop_reason)
    return dataclasses.replace(
        then, outputs=[choices[index] for index in sorted(choices)],
        prompt_token_ids=first.prompt_token_ids or then.prompt_token_ids,
        prompt_logprobs=first.prompt_logprobs or then.prompt_logprobs)


class Accumulator:
    """Deltas added up into the cumulative output (lists extended, not copied)."""

    def __init__(self, prompt_token_ids: list[int]) -> None:
        self.output: RequestOutput | None = None
        self.prompt_token_ids = prompt_token_ids
        self._choices: dict[int, CompletionOutput] = {}

    def add(self, delta: RequestOutput) -> RequestOutput:
        for news in delta.outputs:
            choice = self._choices.get(news.index)
            if choice is None:
                self._choices[news.index] = dataclasses.replace(
                    news, token_ids=list(news.token_ids),
                    logprobs=None if news.logprobs is None else list(news.logprobs))
                continue
            choice.text += news.text
            choice.token_ids.extend(news.token_ids)
            if news.logprobs is not None:
                if choice.logprobs is None:
                    choice.logprobs = list(news.logprobs)
                else:
                    choice.logprobs.extend(news.logprobs)
            choice.cumulative_logprob = news.cumulative_logprob
            choice.finish_reason, choice.stop_reason = news.finish_reason, news.stop_reason
        previous = self.output
        self.output = RequestOutput(
            delta.request_id, delta.prompt if previous is None else previous.prompt,
            self.prompt_token_ids, [self._choices[index] for index in sorted(self._choices)],
            finished=delta.finished, metrics=delta.metrics,
            prompt_logprobs=(delta.prompt_logprobs if previous is None
                             or previous.prompt_logprobs is None else previous.prompt_logprobs))
        return self.output
