"""Iteration-level (continuous) batching under a token budget.

Every step, in this order:

1. Running requests, oldest first: each unfinished sequence gets
   `min(uncomputed tokens, budget left)` tokens, so a decode takes one token
   and a long prompt is computed in chunks (chunked prefill); a request of one
   sequence decoding into a block it holds or a free one, the common case at a
   large batch, is scheduled in a few reads (plan.py's `schedule_decode`). When the pool
   has no block for a running sequence, the newest running request is
   preempted: swapped to the CPU pool, or freed and later recomputed (see
   `SchedulerConfig.preemption_mode`).
2. Swapped requests come back, oldest first, while blocks allow.
3. Waiting requests are admitted FCFS while the budget, `max_num_seqs` and the
   pool allow, starting from the longest prefix the prefix cache holds.

Steps 2 and 3 are skipped in a step that had to preempt, and 3 while any
request is still swapped out. A request under a LoRA adapter holds one of the
device's `max_loras` adapter slots while it runs (adapter_slots.py); one whose
adapter cannot get a slot waits at the head of its queue until one is free.

A request's sequences share blocks: parallel samples fork off the prompt at
its last token, beams fork and drop every step. A sequence about to write into
a block it shares gets a private copy first (`StepInput.blocks_to_copy`).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass

from pagedserve.scheduler.adapter_slots import AdapterSlots
from pagedserve.scheduler.adapter_use import AdapterUse
from pagedserve.scheduler.beam_search import Beam
from pagedserve.scheduler.block_manager import BlockManager
from pagedserve.scheduler.config import SchedulerConfig
from pagedserve.scheduler.plan import Work, commit, plan_group, schedule_decode
from pagedserve.scheduler.progress import grammar_stop, stop_reason
from pagedserve.scheduler.proposers import Proposer, keep_proposals
from pagedserve.scheduler.sequence import FinishReason, Sequence, SequenceGroup, SequenceStatus
from pagedserve.scheduler.speculation import SpecStats, count_drafts, take_speculated
from pagedserve.scheduler.step import Sample, StepInput, StepOutput

__all__ = ["Scheduler", "SchedulerConfig"]  # SchedulerConfig lives in config.py


@dataclass(slots=True)
class _Budget:
    """What a step has left to give: tokens under `max_num_batched_tokens`, and
    sequences under `max_num_seqs`."""

    tokens: int
    seqs: int


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 lora_slots: AdapterSlots | None = None) -> None:
        self.config = config
        self.block_manager = block_manager
        self.adapters = AdapterUse(lora_slots)
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []
        self.swapped: deque[SequenceGroup] = deque()
        self._groups: dict[str, SequenceGroup] = {}
        self._seqs: dict[int, Sequence] = {}
        self._seq_group: dict[int, SequenceGroup] = {}
        self._seq_ids = itertools.count()
        self.num_preemptions = 0
        self.num_swaps = 0
        self.spec_stats = SpecStats()
        self._proposer: Proposer | None = None  # this step's (the policy's choice)
        # When the last decode step's outcome was taken in, and whether it speculated.
        self._last_taken_in: tuple[float, bool] | None = None

    # -- requests ------------------------------------------------------------
    def new_sequence(self, prompt_token_ids: list[int]) -> Sequence:
        return Sequence(next(self._seq_ids), list(prompt_token_ids))

    def add(self, group: SequenceGroup) -> None:
        if group.request_id in self._groups:
            raise ValueError(f"request_id {group.request_id!r} is already in use")
        self.adapters.add(group)
        self._groups[group.request_id] = group
        for seq in group.seqs:
            self._track(seq, group)
        self.waiting.append(group)

    def abort(self, request_id: str) -> SequenceGroup | None:
        """Finish a request now and free every block it holds."""
        group = self._groups.get(request_id)
        if group is None:
            return None
        for seq in group.unfinished_seqs:
            seq.finish(FinishReason.ABORT)
        self._retire(group)
        return group

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    @property
    def waiting_queue_size(self) -> int:
        """Requests waiting to be admitted (new, or preempted to recompute); swapped
        ones are counted apart. get_memory_stats()'s `num_waiting`."""
        return len(self.waiting)

    @property
    def num_running_seqs(self) -> int:
        return sum(len(group.unfinished_seqs) for group in self.running)

    # -- one step ------------------------------------------------------------
    def schedule(self) -> StepInput:
        step = self._schedule()
        self.adapters.attach(step)
        return step

    def _schedule(self) -> StepInput:
        step = StepInput(seqs=[])
        budget = _Budget(tokens=self.config.max_num_batched_tokens,
                         seqs=self.config.max_num_seqs - self.num_running_seqs)
        policy = self.config.speculation
        if policy is not None:
            length = policy.num_drafts(*self._decoding(), self.spec_stats)
            self._proposer = policy.proposer.shortened(length) if length else None
        if not self._schedule_running(step, budget):  # a step that preempted admits no one
            self._schedule_swapped(step, budget)
            if not self.swapped:  # the swapped come back before anyone new starts
                self._schedule_waiting(step, budget)
        if policy is not None:
            self.spec_stats.scheduled(*count_drafts(step), self._proposer is not None)
        return step

    def _decoding(self) -> tuple[int, int]:
        """(sequences, their mean length): what the speculation policy weighs. The
        running ones and the waiting ones that may start beside them: the batch the
        engine is filling to, where a step's drafts are judged at the batch size
        they will run in (a ramp of 30, 60, ... to 256 sequences would otherwise start
        each size unmeasured, and speculate there on the priors)."""
        seqs = [seq for group in self.running for seq in group.unfinished_seqs]
        room = max(0, self.config.max_num_seqs - len(seqs))
        seqs += [seq for group in itertools.islice(self.waiting, room)
                 for seq in group.unfinished_seqs][:room]
        return len(seqs), sum(seq.num_tokens for seq in seqs) // max(1, len(seqs))

    def _schedule_running(self, step: StepInput, budget: _Budget) -> bool:
        """Give each running request its tokens, oldest first; returns whether
        any request had to be preempted to make room."""
        preemptions = self.num_preemptions
        index = 0
        while index < len(self.running) and budget.tokens > 0:
            group = self.running[index]
            if schedule_decode(group, step, self.block_manager, self.config.max_model_len,
                               self.config.eos_token_ids, self._proposer):
                budget.tokens -= 1
            else:
                plan = self._make_room(group, budget, step)
                if plan is None:
                    break  # it was preempted itself, as the newest: no one runs after it
                budget.tokens -= self._commit(group, plan, step)
            index += 1
        return self.num_preemptions > preemptions

    def _make_room(self, group: SequenceGroup, budget: _Budget,
                   step: StepInput) -> list[Work] | None:
        """The running group's plan, once the pool has its blocks: the newest
        running requests are preempted until it fits. None: the group itself
        was the newest left, and is preempted."""
        plan = self._plan(group, budget.tokens)
        while not self._fits(plan):
            victim = self.running.pop()
            self._preempt(victim, step)
            if victim is group:
                return None
            plan = self._plan(group, budget.tokens)  # the victim's blocks may have been shared
        return plan

    def _schedule_swapped(self, step: StepInput, budget: _Budget) -> None:
        """Bring swapped requests back, oldest first, while sequences and blocks allow."""
        while self.swapped and budget.tokens > 0:
            group = self.swapped[0]
            seq_ids = [seq.seq_id for seq in group.unfinished_seqs]
            if not self._can_swap_in(seq_ids, budget) or not self.adapters.hold(group):
                break
            self.swapped.popleft()
            step.blocks_to_swap_in.extend(self.block_manager.swap_in(seq_ids))
            self._start_running(group, budget)
            plan = self._plan(group, budget.tokens)
            if self._fits(plan):  # otherwise it runs from the next step on
                budget.tokens -= self._commit(group, plan, step)

    def _can_swap_in(self, seq_ids: list[int], budget: _Budget) -> bool:
        # Its blocks come back, with a block to spare for each sequence's next tokens.
        needed = self.block_manager.blocks_to_swap_in(seq_ids) + len(seq_ids)
        return (len(seq_ids) <= budget.seqs
                and needed + self._watermark_reserve() <= self.block_manager.num_free_blocks)

    def _schedule_waiting(self, step: StepInput, budget: _Budget) -> None:
        """Admit waiting requests, first come first served, while the token budget,
        `max_num_seqs`, the pool and the adapter slots allow."""
        while self.waiting and budget.tokens > 0:
            group = self.waiting[0]
            if len(group.unfinished_seqs) > budget.seqs:
                break
            plan = self._plan(group, budget.tokens)
            if (not plan or not self._fits(plan, self._watermark_reserve())
                    or not self.adapters.hold(group)):
                break
            self.waiting.popleft()
            if group.metrics.first_scheduled_time is None:
                group.metrics.first_scheduled_time = time.monotonic()
            self._start_running(group, budget)
            budget.tokens -= self._commit(group, plan, step)

    def _start_running(self, group: SequenceGroup, budget: _Budget) -> None:
        self._set_status(group, SequenceStatus.RUNNING)
        self.running.append(group)
        budget.seqs -= len(group.unfinished_seqs)

    def _watermark_reserve(self) -> int:
        """Free blocks an admission or a swap-in must leave. The watermark keeps
        room for running sequences to grow; with none running it would only stop
        a request that fills the pool alone."""
        return self.block_manager.watermark_blocks if self.running else 0

    def update(self, step_input: StepInput, step_output: StepOutput) -> list[SequenceGroup]:
        """Record a step's sampled tokens; returns the requests that advanced.

        Its tokens were counted as computed when it was scheduled. A sample for
        a sequence that finished meanwhile (aborted, or stopped by the step
        before: found one step late) is dropped.
        """
        touched: dict[str, SequenceGroup] = {}
        for scored in step_output.prompt_logprobs:
            seq = self._seqs.get(scored.seq_id)
            if seq is not None and not seq.finished:
                group = self._seq_group[scored.seq_id]
                group.record_prompt_logprobs(scored.first_position, scored.entries)
        by_seq: dict[int, list[Sample]] = {}
        for sample in step_output.samples:
            by_seq.setdefault(sample.seq_id, []).append(sample)
        speculated = {scheduled.seq_id: scheduled for scheduled in step_input.seqs
                      if scheduled.draft_token_ids or scheduled.num_proposals}
        beam_steps: dict[str, dict[int, Sample]] = {}
        for seq_id, samples in by_seq.items():
            seq = self._seqs.get(seq_id)
            if seq is None or seq.finished:  # aborted while the step ran
                continue
            group = self._seq_group[seq_id]
            touched[group.request_id] = group
            seq.num_pending -= 1
            if group.beam_search is not None:
                beam_steps.setdefault(group.request_id, {})[seq_id] = samples[0]
                continue
            # Parallel sampling: the prompt's row was sampled once per sample.
            if len(samples) > 1 and not self._holds_blocks(seq):
                # Preempted by recompute while the step ran: its samples are
                # dropped and drawn again after the prompt, so the samples still
                # fork from one computed prompt instead of each recomputing it.
                continue
            if seq.seq_id in speculated and not take_speculated(
                    seq, samples[0], speculated[seq.seq_id], self.block_manager,
                    self.spec_stats, self._stops):
                continue  # it stopped on a kept draft token
            children = [self._fork(group, seq) for _ in samples[1:]]
            for target, sample in zip([seq, *children], samples, strict=True):
                target.append_token(sample.token_id, sample.logprob, sample.top_logprobs)
                if not self._stops(target):
                    keep_proposals(target, sample.proposals)
        for request_id, beam_samples in beam_steps.items():
            self._advance_beams(self._groups[request_id], beam_samples)
        if self.config.speculation is not None:
            self._spec_step_done(step_input, step_output)
        return list(touched.values())

    def _spec_step_done(self, step_input: StepInput, step_output: StepOutput) -> None:
        """Speculation's figures from a step: its verifications (counted as they were
        taken in); for a step of decodes only, its device time and size, and the
        tokens it gave over the wall time since the step before it was taken in."""
        seqs, stats = step_input.seqs, self.spec_stats
        decode_only = bool(seqs) and all(seq.do_sample and seq.num_tokens
                                         == 1 + len(seq.draft_token_ids or ()) for seq in seqs)
        stats.step_done(sum(seq.num_tokens for seq in seqs), step_output.device_s, decode_only)
        # A step's rate is its tokens over the time since the step before it was taken
        # in, where that step went the same way. The first speculating step after plain
        # ones is timed apart: it pays for the switch (the plain steps' overlap ends, a
        # draft model catches up with the steps it sat out), which the probes' spacing
        # weighs.
        now, last = time.perf_counter(), self._last_taken_in
        speculated = step_input.speculates
        self._last_taken_in = (now, speculated) if decode_only else None
        if decode_only and last is not None and speculated and not last[1]:
            stats.rates.observe_switch(len(seqs), now - last[0])
        if decode_only and last is not None and last[1] == speculated:
            tokens = sum(1 + len(sample.accepted or ()) for sample in step_output.samples)
            stats.rates.observe(len(seqs), speculated, tokens, now - last[0])
            if speculated and step_output.device_s:
                stats.observe_sync_host(len(seqs), max(0.0, now - last[0]
                                                       - step_output.device_s))

    def _stops(self, seq: Sequence) -> bool:
        """Finish the sequence if its newest token ends it; say whether it did."""
        stop = stop_reason(seq, self._seq_group[seq.seq_id].sampling_params, self.config)
        if seq.grammar is not None and stop is None:
            stop = grammar_stop(seq, seq.token_ids[-1])
        if stop is not None:
            self.finish_seq(seq, *stop)
        return stop is not None

    def grammar_of(self, seq_id: int):
        """The structured-output matcher of a live sequence, or None."""
        seq = self._seqs.get(seq_id)
        return None if seq is None else seq.grammar

    def finish_seq(self, seq: Sequence, reason: FinishReason,
                   stop_reason: int | str | None) -> None:
        """Finish one sequence (e.g. on a stop string found after detokenizing)."""
        seq.finish(reason, stop_reason)
        self.block_manager.free(seq.seq_id)

    def free_finished(self, groups: list[SequenceGroup]) -> None:
        for group in groups:
            if group.finished:
                self._retire(group)

    # -- planning --------------------------------------------------------------
    def _plan(self, group: SequenceGroup, budget: int) -> list[Work]:
        return plan_group(group, budget, self.block_manager, self.config.max_model_len,
                          self.config.late_masks, self._proposer)

    def _fits(self, plan: list[Work], reserve: int = 0) -> bool:
        return sum(work.blocks for work in plan) + reserve <= self.block_manager.num_free_blocks

    def _commit(self, group: SequenceGroup, plan: list[Work], step: StepInput) -> int:
        return commit(group, plan, step, self.block_manager, self.config.eos_token_ids)

    def _preempt(self, group: SequenceGroup, step: StepInput) -> None:
        self.adapters.release(group)
        seq_ids = [seq.seq_id for seq in group.unfinished_seqs]
        mode = self.config.preemption_mode
        swap = mode == "swap" or (mode == "auto" and len(seq_ids) > 1)
        # A sequence not yet started (its group was recomputed and only partly
        # re-admitted) has nothing to swap: such a group is recomputed.
        swap = swap and all(self.block_manager.has(seq_id) for seq_id in seq_ids)
        if swap and self.block_manager.can_swap_out(seq_ids):
            step.blocks_to_swap_out.extend(self.block_manager.swap_out(seq_ids))
            self._set_status(group, SequenceStatus.SWAPPED)
            self.swapped.appendleft(group)
            self.num_swaps += 1
        else:
            for seq in group.unfinished_seqs:
                self.block_manager.free(seq.seq_id)
                seq.reset_for_recompute()
            self.waiting.appendleft(group)
        self.num_preemptions += 1

    # -- sequences -------------------------------------------------------------
    def _holds_blocks(self, seq: Sequence) -> bool:
        """Whether it has a block table, on the GPU or swapped out to the CPU."""
        return self.block_manager.has(seq.seq_id) or self.block_manager.is_swapped(seq.seq_id)

    def _fork(self, group: SequenceGroup, parent: Sequence) -> Sequence:
        child = parent.fork(next(self._seq_ids), sample_index=len(group.seqs))
        # A parent preempted by recompute while its step was in flight has no
        # blocks: the child, a copy, is recomputed with it.
        if self._holds_blocks(parent):
            self.block_manager.fork(parent.seq_id, child.seq_id)
        group.seqs.append(child)
        self._track(child, group)
        return child

    def _advance_beams(self, group: SequenceGroup, samples: dict[int, Sample]) -> None:
        """Apply one beam-search step: fork the chosen parents, drop the rest."""
        search = group.beam_search
        assert search is not None  # update() advances only beam-search groups here
        beams = group.unfinished_seqs
        if any(seq.seq_id not in samples for seq in beams):
            return  # cannot happen: a beam group is planned whole or not at all
        top_tokens: list[list[tuple[int, float]]] = []
        for seq in beams:
            candidates = samples[seq.seq_id].candidates
            assert candidates is not None  # a beam's sample carries its candidates
            top_tokens.append(candidates)
        choices = search.step([Beam(seq.output_token_ids, seq.cumulative_logprob) for seq in beams],
                              top_tokens)
        if search.done:  # the answer is in the finished hypotheses
            group.hypotheses = search.finalize()
            for seq in beams:
                self.finish_seq(seq, FinishReason.LENGTH, None)
            return
        used: set[int] = set()
        live = []
        for parent_index, token_id, cumulative in choices:  # fork before any beam moves on
            parent = beams[parent_index]
            seq = parent if parent_index not in used else self._fork(group, parent)
            used.add(parent_index)
            live.append((seq, token_id, cumulative))
        for index, seq in enumerate(beams):
            if index not in used:
                self._drop(seq)
        for seq, token_id, cumulative in live:
            seq.token_ids.append(token_id)
            seq.cumulative_logprob = cumulative
        group.seqs = [seq for seq, _, _ in live]

    def _drop(self, seq: Sequence) -> None:
        seq.finish(FinishReason.ABORT)
        self.block_manager.free(seq.seq_id)
        self._seqs.pop(seq.seq_id, None)
        self._seq_group.pop(seq.seq_id, None)

    def _set_status(self, group: SequenceGroup, status: SequenceStatus) -> None:
        for seq in group.unfinished_seqs:
            seq.status = status

    def _track(self, seq: Sequence, group: SequenceGroup) -> None:
        self._seqs[seq.seq_id] = seq
        self._seq_group[seq.seq_id] = group

    def _retire(self, group: SequenceGroup) -> None:
        if group.request_id in self._groups:
            self.adapters.retire(group)
        for seq in group.seqs:
            self.block_manager.free(seq.seq_id)
            self._seqs.pop(seq.seq_id, None)
            self._seq_group.pop(seq.seq_id, None)
        self._groups.pop(group.request_id, None)
        for queue in (self.running, self.waiting, self.swapped):
            if group in queue:
                queue.remove(group)
                break
