"""A sequence group's RequestOutput, in the kind its request asks for.

Cumulative (everything so far), DELTA (only the news since the last output,
cut from the sequences without building the cumulative output), or, for beam
search, the finished hypotheses decoded once. The engine asks for one after
each step a request advanced in, and once more when it is aborted.
"""

from __future__ import annotations

from typing import cast

from transformers import PreTrainedTokenizerBase

from pagedserve.engine.output_kinds import DeltaTracker
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import RequestOutputKind
from pagedserve.scheduler.sequence import SequenceGroup


class OutputBuilder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase | None) -> None:
        self.tokenizer = tokenizer
        self._trackers: dict[str, DeltaTracker] = {}  # what each DELTA request has had

    def build(self, group: SequenceGroup) -> RequestOutput:
        """The group's output now, as its request's output_kind asks."""
        if group.sampling_params.output_kind is RequestOutputKind.DELTA:
            tracker = self._trackers.get(group.request_id)
            if tracker is None:
                tracker = self._trackers[group.request_id] = DeltaTracker(
                    group.sampling_params.stop)
            if group.beam_search is None:
                return _delta_output(group, tracker)
            return tracker.delta(self._beam_output(group))
        if group.beam_search is None:
            return _request_output(group)
        return self._beam_output(group)

    def forget(self, request_id: str) -> None:
        """The request ended: nothing more is sent of it."""
        self._trackers.pop(request_id, None)

    def _beam_output(self, group: SequenceGroup) -> RequestOutput:
        outputs = []
        if group.hypotheses is not None and group.beam_search is not None:
            eos = group.beam_search.eos_token_ids
            skip = group.sampling_params.skip_special_tokens
            for index, hyp in enumerate(group.hypotheses):
                # One sequence's ids decode to a str (transformers' type also covers batches).
                text = (cast(str, self.tokenizer.decode(hyp.output_token_ids,
                                                        skip_special_tokens=skip))
                        if self.tokenizer else "")
                ended = bool(hyp.output_token_ids) and hyp.output_token_ids[-1] in eos
                outputs.append(CompletionOutput(
                    index=index, text=text, token_ids=list(hyp.output_token_ids),
                    cumulative_logprob=hyp.cumulative_logprob, logprobs=None,
                    finish_reason="stop" if ended else "length", stop_reason=None))
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outputs,
                             finished=group.finished, prompt_logprobs=_prompt_logprobs(group))


def _prompt_logprobs(group: SequenceGroup) -> list[dict[int, float] | None] | None:
    """The prompt's scores once all are in (a prefill in chunks fills them in steps)."""
    if group.prompt_logprobs is None or group.needs_prompt_logprobs:
        return None
    return list(group.prompt_logprobs)


def _delta_output(group: SequenceGroup, tracker: DeltaTracker) -> RequestOutput:
    """What is new in each sequence since the request's last output (best_of == n)."""
    want_logprobs = group.sampling_params.logprobs is not None
    outputs = []
    for index, seq in enumerate(group.seqs):
        news = tracker.news(index, seq.output_text, seq.token_ids, seq.num_prompt_tokens,
                            seq.output_logprobs if want_logprobs else None,
                            seq.finish_reason.value if seq.finish_reason else None,
                            seq.stop_reason, _cumulative(group, seq))
        if news is not None:
            outputs.append(news)
    return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outputs,
                         finished=group.finished,
                         prompt_logprobs=tracker.prompt_logprobs(_prompt_logprobs(group)))


def _request_output(group: SequenceGroup) -> RequestOutput:
    params = group.sampling_params
    seqs = group.seqs
    if group.best_of > params.n:
        seqs = sorted(seqs, key=lambda seq: seq.cumulative_logprob, reverse=True)[:params.n]
    outputs = [
        CompletionOutput(
            index=index,
            text=seq.output_text,
            token_ids=seq.output_token_ids,
            cumulative_logprob=_cumulative(group, seq),
            logprobs=list(seq.output_logprobs) if params.logprobs is not None else None,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            stop_reason=seq.stop_reason,
        )
        for index, seq in enumerate(seqs)
    ]
    return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outputs,
                         finished=group.finished, prompt_logprobs=_prompt_logprobs(group))


def _cumulative(group: SequenceGroup, seq) -> float | None:
    """A sample's cumulative log-probability where its request uses log-probabilities (as
    vLLM: None otherwise, since the sampler computes them only for such rows)."""
    params = group.sampling_params
    return seq.cumulative_logprob if params.logprobs is not None or group.best_of > params.n \
        else None
