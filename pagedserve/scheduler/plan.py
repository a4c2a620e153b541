"""A request's share of one step: which tokens of each sequence it computes, the blocks
they take (`plan_group`), and the `ScheduledSequence` the worker gets for each
(`scheduled_sequence`), put in the step with its blocks (`commit`). A request of one
sequence decoding its next token, the common case at a large batch, goes in without
a plan (`schedule_decode`). The scheduler decides whether a plan runs; this says what
it is and puts it in."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.scheduler.block_manager import BlockManager
from pagedserve.scheduler.progress import at_limit, plans_ahead, reads_tokens_so_far, speculates
from pagedserve.scheduler.proposers import Proposer
from pagedserve.scheduler.sequence import Sequence, SequenceGroup
from pagedserve.scheduler.step import ScheduledSequence, StepInput


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


def schedule_decode(group: SequenceGroup, step: StepInput, manager: BlockManager,
                    max_model_len: int, eos_token_ids: frozenset[int],
                    proposer: Proposer | None) -> bool:
    """The common case, in a few reads: a request of one sequence decoding one token
    (the newest, or the one in flight) into a block it holds or a free one, put in the
    step as `plan_group` and `commit` would. Whether it was; if not, the full plan
    decides: forks, beams, prompt chunks, prompt logprobs, grammars, speculation,
    windows, copies on write, penalties with a token in flight, a last token in
    flight, and preemption."""
    seqs = group.seqs
    if len(seqs) != 1 or group.beam_search is not None or group.prompt_logprobs is not None:
        return False
    seq = seqs[0]
    if (len(seq.token_ids) + seq.num_pending - seq.num_computed_tokens != 1
            or seq.grammar is not None or group.best_of != 1
            or manager.sliding_window is not None or not manager.has(seq.seq_id)
            or (proposer is not None and speculates(group))):
        return False
    params = group.sampling_params
    if seq.num_pending and (reads_tokens_so_far(params) or params.structured_outputs is not None
                            or at_limit(seq, params, max_model_len)):
        return False
    if manager.blocks_to_append(seq.seq_id, 1) > manager.num_free_blocks:
        return False  # a copy on write, or a block that only preemption frees
    _put_in(step, group, seq, 1, manager, eos_token_ids)
    return True


def commit(group: SequenceGroup, plan: list[Work], step: StepInput, manager: BlockManager,
           eos_token_ids: frozenset[int]) -> int:
    """Give the plan its blocks and put its sequences in the step; returns its tokens."""
    _allocate_new(group, plan, manager)
    for work in plan:
        seq, num_tokens = work.seq, work.num_tokens
        if manager.sliding_window is not None:  # blocks before this step's window
            manager.release_before_window(seq.seq_id, seq.num_computed_tokens)
        if manager.needs_copy_on_write(seq.seq_id, num_tokens):
            step.blocks_to_copy.append(manager.copy_on_write(seq.seq_id))
        _put_in(step, group, seq, num_tokens, manager, eos_token_ids, work.draft,
                work.lookahead)
    return sum(work.num_tokens for work in plan)


def _put_in(step: StepInput, group: SequenceGroup, seq: Sequence, num_tokens: int,
            manager: BlockManager, eos_token_ids: frozenset[int],
            draft: list[int] | None = None, lookahead: int = 0) -> None:
    """The sequence's `num_tokens` (its `draft` among them) in the step, with their slots
    and `lookahead` more; counted as computed."""
    # Drafts and lookahead slots make no cache keys: the keys are of token_ids.
    manager.append_slots(seq.seq_id, num_tokens + lookahead, seq.token_ids)
    scheduled = scheduled_sequence(group, seq, num_tokens - len(draft or ()),
                                   manager.block_table(seq.seq_id), eos_token_ids, draft,
                                   lookahead)
    step.seqs.append(scheduled)
    seq.num_computed_tokens += num_tokens  # the step will have computed them
    seq.num_pending += scheduled.do_sample


def _allocate_new(group: SequenceGroup, plan: list[Work], manager: BlockManager) -> None:
    """Give each sequence without a block table one, holding its prefix-cache hits.

    All of them first, so no sequence's fresh block can evict a hit another sequence of
    this plan is counting on.
    """
    for work in plan:
        seq = work.seq
        if not manager.has(seq.seq_id):
            seq.num_computed_tokens = len(work.computed_blocks) * manager.block_size
            manager.allocate(seq.seq_id, seq.num_computed_tokens, seq.token_ids,
                             work.computed_blocks, group.cache_key)


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
