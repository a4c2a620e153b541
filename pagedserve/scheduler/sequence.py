"""Request and sequence state.

There is no prefill phase and no decode phase: a sequence has `num_tokens`
(prompt + generated) and `num_computed_tokens` (tokens whose K/V are in the
cache), and every step the scheduler lets the latter catch up with the former
under a token budget. A prompt computed in several steps (chunked prefill), a
decode step (one token behind) and a recompute after preemption (computed reset
to 0) are all the same thing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagedserve.lora_request import AdapterSpec
from pagedserve.outputs import RequestMetrics
from pagedserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedserve.scheduler.beam_search import BeamSearch, Hypothesis


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted with its blocks moved to the CPU pool
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt_token_ids: list[int]
    sample_index: int = 0  # which of the request's samples (picks its seeded stream)
    token_ids: list[int] = field(init=False)  # prompt followed by outputs
    num_computed_tokens: int = 0
    # Tokens a scheduled step will sample, not yet known here: with asynchronous
    # scheduling the next step is planned while this one runs (scheduler.py).
    num_pending: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float = 0.0
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    output_text: str = ""
    detokenizer_state: Any = None  # owned by the Detokenizer
    proposer_state: Any = None  # owned by speculation's proposer (speculation.Proposer)
    # Tokens whose KV a draft model has in its cache (worker/draft.py): it computes
    # only for steps that speculate, catching up from here.
    draft_computed: int = 0
    # A structured output's matcher (engine/grammar.py's Matcher): where this sequence
    # stands in its grammar. None: unconstrained.
    grammar: Any = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprob: float,
                     top_logprobs: dict[int, float] | None) -> None:
        self.token_ids.append(token_id)
        self.cumulative_logprob += logprob
        if top_logprobs is not None:
            self.output_logprobs.append(top_logprobs)

    def finish(self, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def fork(self, seq_id: int, sample_index: int) -> Sequence:
        """A copy that shares this sequence's history and goes its own way from here."""
        child = Sequence(seq_id, self.prompt_token_ids, sample_index)
        child.token_ids = list(self.token_ids)
        child.num_computed_tokens = self.num_computed_tokens
        child.status = self.status
        child.cumulative_logprob = self.cumulative_logprob
        child.output_logprobs = list(self.output_logprobs)
        child.grammar = None if self.grammar is None else self.grammar.fork()
        return child

    def reset_for_recompute(self) -> None:
        """Preempted: its blocks are gone, so every token must be computed again."""
        self.num_computed_tokens = 0
        self.draft_computed = 0
        self.status = SequenceStatus.WAITING


@dataclass(eq=False)
class SequenceGroup:
    """One request: sequences that share a prompt and sampling params.

    It starts with one sequence, which computes the prompt once. Parallel
    sampling then forks it into `best_of` samples at the prompt's last token;
    beam search forks and drops beams every step as `beam_search` decides,
    and its answer is `hypotheses`, not the live sequences.
    """

    request_id: str
    seqs: list[Sequence]
    sampling_params: SamplingParams
    prompt: str | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics.now)
    beam_search: BeamSearch | None = None
    hypotheses: list[Hypothesis] | None = None  # beam search's result once finished
    # With SamplingParams.prompt_logprobs: per prompt position, {token: logprob} of
    # the prompt's token and the top-k; None for the first token, which nothing predicts.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # The LoRA adapter the request runs under (None: the base model), and the
    # device slot it holds while running (scheduler/adapter_slots.py).
    lora: AdapterSpec | None = None
    lora_slot: int | None = None

    def __post_init__(self) -> None:
        if self.sampling_params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt tokens are still to be scored (they are, once, by the first computation)."""
        return (self.prompt_logprobs is not None
                and len(self.prompt_logprobs) < len(self.prompt_token_ids))

    def record_prompt_logprobs(self, first_position: int, entries: list[dict[int, float]]) -> None:
        """Scores of positions first_position...; those already held (a recompute) are kept."""
        if self.prompt_logprobs is None:
            raise ValueError(f"request {self.request_id!r} did not ask for prompt logprobs")
        held = len(self.prompt_logprobs)
        if first_position > held:
            raise ValueError(f"prompt logprobs from position {first_position} leave a gap after "
                             f"{held}")
        self.prompt_logprobs.extend(entries[held - first_position:])

    @property
    def lora_id(self) -> int:
        return self.lora.lora_id if self.lora is not None else 0

    @property
    def cache_key(self) -> str | None:
        """What the prefix cache keys this request's blocks by, beside their tokens:
        the same prompt under two adapters is two different contexts."""
        return self.lora.name if self.lora is not None else None

    @property
    def best_of(self) -> int:
        """The request's number of candidate sequences (samples or beams)."""
        best_of = self.sampling_params.best_of
        assert best_of is not None  # SamplingParams.__post_init__ defaults it to n
        return best_of

    @property
    def forks_at_prompt_end(self) -> bool:
        """Parallel sampling that has not yet forked its samples off the prompt."""
        return self.beam_search is None and self.best_of > len(self.seqs)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.seqs[0].prompt_token_ids

    @property
    def unfinished_seqs(self) -> list[Sequence]:
        return [seq for seq in self.seqs if not seq.finished]

    @property
    def finished(self) -> bool:
        return all(seq.finished for seq in self.seqs)
