"""The scheduler <-> worker contract: one batched step in, sampled tokens out.

Both are plain, picklable dataclasses with no model tensors inside, so the same
StepInput can be sent to one in-process worker or to every tensor-parallel
rank. Workers never send logits back, only the sampled token ids (and the
log-probabilities a request asked for).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagedserve.lora_request import AdapterSpec
from pagedserve.sampling_params import SamplingParams


@dataclass(slots=True)
class ScheduledSequence:
    """One sequence's share of a step.

    The step computes `num_tokens` tokens at positions `start_pos ...
    start_pos + num_tokens - 1` and writes their K/V into the slots of
    `block_table`. When `do_sample` is set the last of them is the sequence's
    newest token and the step samples the one after it.

    With asynchronous scheduling a step is planned while the one before it
    runs, so a sequence's newest token may not be known yet when its next step
    is planned. Then `last_token_in_flight` is set: the step's input is
    `token_ids` followed by one more token, the one the step in flight samples
    for this sequence, which the worker appends before running the step
    (worker.py). `token_ids` holds only known tokens.
    """

    seq_id: int
    token_ids: list[int]  # the known tokens this step computes, in position order
    start_pos: int  # the position of the step's first token
    block_table: list[int]  # the sequence's KV blocks, in position order
    do_sample: bool  # the step's last token is the newest: sample the next one
    # The step's last input token is the one the step in flight samples for this
    # sequence: not in `token_ids`, and counted by `num_tokens`.
    last_token_in_flight: bool = False
    sampling_params: SamplingParams | None = None  # set when do_sample is
    # The index of the token to be sampled among the outputs; with a seed it
    # picks the random stream, so a seeded request samples the same token at the
    # same index whatever batch it runs in and however often it is preempted.
    output_index: int = 0
    # Only when the request uses penalties: the token history they count.
    prompt_token_ids: list[int] | None = None
    output_token_ids: list[int] | None = None
    # Parallel sampling: the prompt's last row is sampled `num_samples` times,
    # once per sample of the request; `sample_index` is this sequence's own
    # index among them (it picks the seeded random stream too).
    num_samples: int = 1
    sample_index: int = 0
    # Beam search: instead of sampling, return this many best next tokens.
    # None: not a beam, the sequence samples.
    num_candidates: int | None = None
    # Prompt logprobs: the first len(prompt_targets) rows of this step are scored
    # against these prompt tokens (row at position p against the token at p + 1),
    # each with its top `prompt_logprobs` alternatives (0: the prompt token's own
    # logprob only). None: the request asked for no prompt logprobs; it is set
    # whenever `prompt_targets` is.
    prompt_targets: list[int] | None = None
    prompt_logprobs: int | None = None
    # The device slot of the sequence's LoRA adapter; None: the base model.
    lora_slot: int | None = None
    # min_tokens not yet reached: EOS and the stop token ids may not be sampled.
    blocked_token_ids: list[int] | None = None
    # A structured output's constraint on the sampled token: the row of
    # StepInput.token_bitmask that says which tokens are allowed. None: any token.
    bitmask_row: int | None = None
    # Speculative decoding: the last tokens of `token_ids` are these proposed ones, not
    # the sequence's own: the step computes them, and the sampler verifies them against
    # the target's rows before them (worker/spec_verify.py). None: a plain step.
    draft_token_ids: list[int] | None = None
    # A draft model on the worker proposes this many tokens for the sequence's next
    # step once this one is verified (Sample.proposals), writing its own KV for them
    # into the slots the sequence holds past the step's tokens. 0: none. Its cache
    # first catches up with `draft_context`, the tokens at `start_pos -
    # len(draft_context)` onwards that the target computed in steps it sat out.
    num_proposals: int = 0
    draft_context: list[int] | None = None
    # The token after the step's last, where it is known already: a prompt chunk that is
    # not the prompt's last. An EAGLE head reads it beside the last row's hidden state.
    next_token_id: int | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens this step computes: `token_ids`, and the one in flight if any."""
        return len(self.token_ids) + self.last_token_in_flight

    @property
    def context_len(self) -> int:
        """Tokens in the cache once this step has written its own."""
        return self.start_pos + self.num_tokens


@dataclass(frozen=True)
class StepInput:
    seqs: list[ScheduledSequence]
    # (source block, destination block) pairs.
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    # Adapters to put in device slots before the step runs, and adapters unloaded
    # since the last step (scheduler/adapter_slots.py, worker/worker_lora.py).
    lora_loads: list[tuple[int, AdapterSpec]] = field(default_factory=list)
    lora_unloads: list[int] = field(default_factory=list)
    # Structured outputs: [rows, ceil(vocab / 32)] int32 (a torch tensor on the host),
    # one row per constrained sampling sequence, bit set = token allowed
    # (engine/grammar.py fills it, worker/token_masks.py applies it). None: no row is.
    # In-process, a step sent while the one before runs may carry a PendingBitmask
    # instead, which the engine fills once that step's tokens are in.
    token_bitmask: Any = None

    @property
    def num_tokens(self) -> int:
        return sum(seq.num_tokens for seq in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not (self.seqs or self.blocks_to_swap_in or self.blocks_to_swap_out
                    or self.blocks_to_copy or self.lora_unloads)

    @property
    def speculates(self) -> bool:
        """Does a sequence verify drafts, or have a draft model propose, in this step?"""
        return any(seq.draft_token_ids or seq.num_proposals for seq in self.seqs)


@dataclass(frozen=True)
class Sample:
    seq_id: int
    token_id: int
    logprob: float  # log-probability of token_id under the model's raw distribution
    top_logprobs: dict[int, float] | None = None  # sampled token first, then the top-k
    # Beam search: the best (token_id, logprob) continuations, best first.
    candidates: list[tuple[int, float]] | None = None
    # Speculative decoding: the draft tokens the target kept, with their raw
    # log-probabilities, in order; `token_id` follows them. None: a plain step.
    accepted: list[tuple[int, float]] | None = None
    # A draft model's proposals for the sequence's next step (after `token_id`).
    proposals: list[int] | None = None


@dataclass(frozen=True)
class PromptLogprobs:
    """The scored prompt tokens of one sequence's step, from position `first_position` on."""

    seq_id: int
    first_position: int
    # Per token: {token_id: logprob}, the prompt's own token first, then the top-k.
    entries: list[dict[int, float]]


@dataclass(frozen=True)
class StepOutput:
    samples: list[Sample]
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    # Seconds the device spent on the step, where the worker knows (CUDA events,
    # the simulator's model, a CPU worker's own compute time).
    device_s: float | None = None
