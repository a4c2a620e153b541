"""What a request returns: the public result types (vLLM-compatible)."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class CompletionOutput:
    """One generated sequence of a request."""

    index: int
    text: str
    token_ids: list[int]
    # Sum of the generated tokens' log-probabilities; None unless SamplingParams.logprobs
    # is set (or best_of > n ranks the samples by it), as in vLLM.
    cumulative_logprob: float | None
    # Per generated token: {token_id: logprob}, the sampled token first, then the
    # top-`logprobs` alternatives. None unless SamplingParams.logprobs is set.
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """When a request arrived, was first scheduled, got its first token and finished.

    Seconds on this process's `time.monotonic()` clock.
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @classmethod
    def now(cls) -> RequestMetrics:
        return cls(arrival_time=time.monotonic())


@dataclass
class RequestOutput:
    """The state of one request after an engine step (cumulative, not a delta)."""

    request_id: str
    prompt: str | None
    # None only in a Serve replica's outputs after a request's first: the
    # ingress, which tokenized the prompt, holds its ids (cluster/server.py).
    prompt_token_ids: list[int] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    # With SamplingParams.prompt_logprobs, once the whole prompt is computed: per
    # prompt token {token_id: logprob}, its own first, then the top-k; None first.
    prompt_logprobs: list[dict[int, float] | None] | None = None
