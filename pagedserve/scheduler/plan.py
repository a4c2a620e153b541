"""A request's share of one step: which tokens of each sequence it computes, the blocks
they take (`plan_group`), and the `ScheduledSequence` the worker gets for each
(`scheduled_sequence`). The scheduler decides whether a plan runs; this says what
it is."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.scheduler.block_manager import BlockManager
from pagedserve.scheduler.progress import at_limit, plans_ahead, speculates
from pagedserve.scheduler.proposers import Proposer
from pagedserve.scheduler.sequence import Sequence, SequenceGroup
from pagedserve.scheduler.step import ScheduledSequence


@dataclass(slots=True)
class Work:
    """One sequence's tokens in a step's plan."""

    seq: Sequence
    num_tokens: int
    computed_blocks: list[int]  # prefix-cache hits, for a sequence without a table yet
    blocks: int  # free blocks these tokens take (a copy on write included)
    # Speculated tokens computed after the sequence's own (counted in num_tokens).
    draft: list[int] = field(default_factory=list)
    # Slots past num_tokens for a draft model's proposals (counted in blocks).
    lookahead: int = 0


def plan_group(group: SequenceGroup, budget: int, manager: BlockManager,
               max_model_len: int, late_masks: bool = False,
               proposer: Proposer | None = None) -> list[Work]:
    """Each unfinished sequence's tokens this step, within `budget` tokens, and the free
    blocks they take; empty while the group must wait (`late_masks`: plans_ahead's).
    With a `proposer`, a decode of a request that speculates computes its proposals
    too, for the worker to verify, and a step that samples reserves the proposer's
    lookahead."""
    seqs = group.unfinished_seqs
    speculating = proposer is not None and speculates(group)
    if any(seq.num_pending for seq in seqs) and not plans_ahead(group, late_masks,
                                                                speculating):
        return []  # it waits for the step in flight to say what it sampled
    # Where each sequence's computing starts: after its prefix-cache hits, for one
    # without a table (cached blocks have no logits: a prompt still to be scored
    # is computed whole).
    starts = []
    for seq in seqs:
        computed = []
        if not manager.has(seq.seq_id) and not group.needs_prompt_logprobs:
            computed = manager.computed_blocks(seq.token_ids, group.cache_key)
        starts.append((seq, computed,
                       max(seq.num_computed_tokens, len(computed) * manager.block_size)))
    # Beams choose their next tokens together, so while any beam is still
    # catching up (a recompute), the others hold back their last token.
    hold_last = group.beam_search is not None and any(
        _left(seq, start) > 1 for seq, _, start in starts)
    plan = []
    claimed: set[int] = set()  # cached blocks this plan's new tables already reuse
    for seq, computed, start in starts:
        if budget <= 0:
            break
        if seq.num_pending and at_limit(seq, group.sampling_params, max_model_len):
            continue  # the token in flight is its last
        num_tokens = min(_left(seq, start) - int(hold_last), budget)
        draft = []
        if speculating and num_tokens == 1 == _left(seq, start) and manager.has(seq.seq_id):
            assert proposer is not None
            max_tokens = group.sampling_params.max_tokens or max_model_len
            room = min(budget, max_tokens - seq.num_output_tokens,
                       max_model_len - seq.num_tokens) - 1  # tokens past the sampled one
            draft = proposer.draft(seq, room)
            if draft and seq.grammar is not None:  # drafts the grammar allows, no more
                draft = draft[:seq.grammar.valid_prefix(draft)]
            num_tokens += len(draft)
        lookahead = 0
        if speculating and start + num_tokens - len(draft) == seq.num_tokens:  # it samples
            assert proposer is not None
            lookahead = max(0, min(proposer.lookahead, max_model_len - start - num_tokens))
        if num_tokens > 0:
            slots = num_tokens + lookahead
            blocks = (manager.blocks_to_append(seq.seq_id, slots)
                      if manager.has(seq.seq_id) else
                      manager.blocks_to_allocate(start + slots, computed, claimed))
            claimed.update(computed)
            plan.append(Work(seq, num_tokens, computed, blocks, draft, lookahead))
            budget -= num_tokens
    if group.beam_search is not None and not hold_last and len(plan) < len(seqs):
        return []  # not every beam fits the budget: they wait a step together
    return plan


def scheduled_sequence(group: SequenceGroup, seq: Sequence, num_tokens: int,
                       block_table: list[int], eos_token_ids: frozenset[int] = frozenset(),
                       draft: list[int] | None = None, num_proposals: int = 0
                       ) -> ScheduledSequence:
    """The sequence's share of the step: its next `num_tokens` tokens, whose
    slots it holds already, then the `draft` tokens speculated after them."""
    params, beam = group.sampling_params, group.beam_search
    start = seq.num_computed_tokens
    end = start + num_tokens
    do_sample = end == seq.num_tokens + seq.num_pending
    # Penalties count the tokens so far; bad words look at the output's last tokens.
    penalties = do_sample and (params.uses_penalties or bool(params.bad_words_token_ids))
    output_index = seq.num_output_tokens + seq.num_pending
    blocked = None
    if do_sample and output_index < params.min_tokens:
        blocked = sorted((set() if params.ignore_eos else set(eos_token_ids))
                         | set(params.stop_token_ids))
    return ScheduledSequence(
        seq_id=seq.seq_id,
        token_ids=seq.token_ids[start:end] + (draft or []),
        last_token_in_flight=end > seq.num_tokens,  # the worker has that token
        start_pos=start,
        block_table=list(block_table),  # a copy, not the live list
        do_sample=do_sample,
        sampling_params=params if do_sample else None,
        output_index=output_index,
        prompt_token_ids=seq.prompt_token_ids if penalties else None,
        output_token_ids=seq.output_token_ids if penalties else None,
        num_samples=group.best_of if do_sample and group.forks_at_prompt_end else 1,
        sample_index=seq.sample_index,
        num_candidates=beam.candidates_per_beam if do_sample and beam else None,
        prompt_targets=_prompt_targets(seq, start, end) if group.needs_prompt_logprobs
        else None,
        prompt_logprobs=params.prompt_logprobs,
        lora_slot=group.lora_slot,
        blocked_token_ids=blocked,
        draft_token_ids=draft or None,
        num_proposals=num_proposals,
        draft_context=seq.token_ids[seq.draft_computed:start] if num_proposals else None,
        next_token_id=seq.token_ids[end] if end < seq.num_tokens else None,
    )


def _left(seq: Sequence, start: int) -> int:
    """Tokens `seq` has to compute from position `start` (a token in flight included)."""
    return seq.num_uncomputed_tokens - (start - seq.num_computed_tokens)


def _prompt_targets(seq: Sequence, start: int, end: int) -> list[int] | None:
    """The prompt tokens that rows `start ... end - 1` predict, to be scored; None
    when those rows predict no prompt token."""
    last = min(end, seq.num_prompt_tokens - 1)
    return seq.token_ids[start + 1:last + 1] if last > start else None
