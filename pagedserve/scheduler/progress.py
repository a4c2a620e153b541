"""Rules about one request's progress, which the scheduler applies every step:
whether a sequence stops on its newest token, whether the tokens in flight
bring it to its limit, and whether its next step can be planned before the
one in flight returns (async scheduling).
"""

from __future__ import annotations

import logging

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.config import SchedulerConfig
from pagedserve.scheduler.sequence import FinishReason, Sequence, SequenceGroup

logger = logging.getLogger(__name__)


def stop_reason(seq: Sequence, params: SamplingParams, config: SchedulerConfig
                ) -> tuple[FinishReason, int | None] | None:
    """Why the sequence ends with its newest token (and the stop token), or None."""
    token = seq.token_ids[-1]
    if not params.ignore_eos and token in config.eos_token_ids:
        return FinishReason.STOP, None
    if token in params.stop_token_ids:
        return FinishReason.STOP, token
    if seq.num_output_tokens >= _max_tokens(params) or seq.num_tokens >= config.max_model_len:
        return FinishReason.LENGTH, None
    return None


def grammar_stop(seq: Sequence, token: int) -> tuple[FinishReason, int | None] | None:
    """Advance a constrained sequence's grammar by its newest token: None while the
    grammar goes on; STOP once it is complete (its stop token accepted, as when EOS is
    ignored); ABORT for a token the grammar does not allow, which the step's mask
    rules out, so it means the mask was missing."""
    if not seq.grammar.accept(token):
        logger.error("sequence %d sampled token %d, which its grammar does not allow: "
                     "ended", seq.seq_id, token)
        return FinishReason.ABORT, None
    if seq.grammar.terminated:
        return FinishReason.STOP, token
    return None


def at_limit(seq: Sequence, params: SamplingParams, max_model_len: int) -> bool:
    """With the tokens in flight, the sequence reaches max_tokens or the context."""
    return (seq.num_output_tokens + seq.num_pending >= _max_tokens(params)
            or seq.num_tokens + seq.num_pending >= max_model_len)


def _max_tokens(params: SamplingParams) -> int:
    """The engine gives the scheduler a number: None (up to the context) is resolved first."""
    assert params.max_tokens is not None
    return params.max_tokens


def speculates(group: SequenceGroup) -> bool:
    """Can the group's decodes be speculated, keeping exactly what plain decoding gives?

    One sequence, greedy or unseeded sampling from the temperature, top-k, top-p
    and min-p distribution, no logprobs: what the verifier reproduces exactly
    (worker/spec_verify.py). Other requests decode plainly beside them.
    """
    params = group.sampling_params
    return (group.beam_search is None and group.best_of == 1 and params.logprobs is None
            and params.prompt_logprobs is None and not params.uses_penalties
            and not params.bad_words
            and not params.logit_bias and params.allowed_token_ids is None
            and params.min_tokens == 0 and (params.seed is None or params.greedy))


def reads_tokens_so_far(params: SamplingParams) -> bool:
    """Whether sampling the next token looks at the tokens so far (penalties, bad
    words): its step cannot be planned before the token in flight is known."""
    return params.uses_penalties or bool(params.bad_words)


def plans_ahead(group: SequenceGroup, late_masks: bool = False,
                speculating: bool = False) -> bool:
    """Can the group's next step be planned before the one in flight returns?

    A sequence decoding on its own can: its next input is the token in
    flight, which the worker fills in. Beams (chosen on the host), penalties
    and bad words (which look at the tokens so far), samples about to fork,
    and sequences catching up after a preemption wait for the step's outcome.
    So do constrained sequences, unless the engine fills masks late
    (`late_masks`): the mask of their next token depends on the one in flight,
    and is then filled once it is in, while the forward runs. Speculating
    requests wait too: their proposals read the tokens so far.
    """
    params = group.sampling_params
    if (speculating or group.beam_search is not None or reads_tokens_so_far(params)
            or group.best_of > 1 or (params.structured_outputs is not None and not late_masks)):
        return False
    return all(seq.num_computed_tokens == seq.num_tokens
               for seq in group.unfinished_seqs if seq.num_pending)
