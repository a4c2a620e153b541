"""Incremental detokenization and stop strings.

Text grows token by token through `tokenizers`' DecodeStream, which holds
back bytes until they form whole UTF-8 characters and, primed with the
prompt, gets leading spaces right for SentencePiece-style vocabularies.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.sequence import FinishReason, Sequence

# DecodeStream needs only a few tokens of context to place the first space.
_PROMPT_CONTEXT = 8


@dataclass
class _State:
    stream: DecodeStream
    num_decoded: int = 0  # output tokens already turned into text


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def update(self, seq: Sequence, params: SamplingParams) -> str | None:
        """Append the text of seq's new output tokens; return the stop string it hit, if any."""
        state = seq.detokenizer_state
        if state is None:
            context = seq.prompt_token_ids[-_PROMPT_CONTEXT:]
            state = seq.detokenizer_state = _State(
                DecodeStream(ids=context, skip_special_tokens=params.skip_special_tokens))
        # Only the tokens not yet decoded: slicing all outputs every step would be
        # quadratic in the output length.
        new_tokens = seq.token_ids[seq.num_prompt_tokens + state.num_decoded:]
        old_len = len(seq.output_text)
        state.num_decoded += len(new_tokens)
        if _stopped_by_token(seq) and not params.include_stop_str_in_output:
            new_tokens = new_tokens[:-1]  # EOS or a stop token id: not text (vLLM's rule)
        pieces = [state.stream.step(self.tokenizer, token) for token in new_tokens]
        seq.output_text += "".join(piece for piece in pieces if piece)
        if seq.num_output_tokens < params.min_tokens:  # stop strings wait for min_tokens
            return None
        return _trim_stop(seq, params.stop, old_len, params.include_stop_str_in_output)


def _stopped_by_token(seq: Sequence) -> bool:
    """The sequence ended on its last token: EOS, a stop token id, or its grammar's end."""
    return (seq.finish_reason is FinishReason.STOP
            and not isinstance(seq.stop_reason, str))


def _trim_stop(seq: Sequence, stops: tuple[str, ...], old_len: int,
               include_stop: bool = False) -> str | None:
    """Cut the text before (or, with include_stop, after) the first stop string that
    ends in the new text."""
    if not stops:
        return None
    text = seq.output_text
    first: tuple[int, str] | None = None
    for stop in stops:
        # A match must end in the new text, so it starts after old_len - len(stop).
        index = text.find(stop, max(0, old_len - len(stop) + 1))
        if index != -1 and (first is None or index < first[0]):
            first = (index, stop)
    if first is None:
        return None
    index, stop = first
    seq.output_text = text[:index + len(stop)] if include_stop else text[:index]
    return stop
