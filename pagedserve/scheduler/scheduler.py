"""Iteration-level (continuous) batching under a token budget.

Every step, running requests go first, oldest first: each unfinished sequence
gets `min(uncomputed tokens, budget left)` tokens, so a decode takes one token
and a long prompt is computed in chunks (chunked prefill). When the pool has no
block for a running sequence, the newest running request is preempted: its
blocks are freed and it goes back to the front of the waiting queue, to be
recomputed from its prompt and the tokens it had already generated. Waiting
requests are admitted FCFS while the budget, `max_num_seqs` and the pool allow,
and never in a step that had to preempt.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pagedserve.scheduler.block_manager import BlockManager
from pagedserve.scheduler.sequence import FinishReason, Sequence, SequenceGroup, SequenceStatus
from pagedserve.scheduler.step import ScheduledSequence, StepInput, StepOutput


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    eos_token_ids: frozenset[int] = frozenset()


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []
        self._groups: dict[str, SequenceGroup] = {}
        self._seqs: dict[int, Sequence] = {}
        self._seq_group: dict[int, SequenceGroup] = {}
        self.num_preemptions = 0

    # -- requests ------------------------------------------------------------
    def add(self, group: SequenceGroup) -> None:
        if group.request_id in self._groups:
            raise ValueError(f"request_id {group.request_id!r} is already in use")
        self._groups[group.request_id] = group
        for seq in group.seqs:
            self._seqs[seq.seq_id] = seq
            self._seq_group[seq.seq_id] = group
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
        return bool(self.waiting or self.running)

    @property
    def num_running_seqs(self) -> int:
        return sum(len(group.unfinished_seqs) for group in self.running)

    # -- one step ------------------------------------------------------------
    def schedule(self) -> StepInput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted = False

        index = 0
        while index < len(self.running) and budget > 0:
            group = self.running[index]
            plan = self._plan(group, budget)
            while not self._fits(plan):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is group:
                    break
            else:
                budget -= self._commit(plan, scheduled)
                index += 1

        num_seqs = self.num_running_seqs
        while self.waiting and budget > 0 and not preempted:
            group = self.waiting[0]
            seqs = group.unfinished_seqs
            if num_seqs + len(seqs) > self.config.max_num_seqs:
                break
            plan = self._plan(group, budget)
            # The watermark keeps room for running sequences to grow; with none
            # running it would only stop a request that fills the pool alone.
            reserve = self.block_manager.watermark_blocks if self.running else 0
            if not self._fits(plan, reserve):
                break
            self.waiting.popleft()
            for seq in seqs:
                seq.status = SequenceStatus.RUNNING
            self.running.append(group)
            num_seqs += len(seqs)
            budget -= self._commit(plan, scheduled)
        return StepInput(seqs=scheduled)

    def update(self, step_input: StepInput, step_output: StepOutput) -> list[SequenceGroup]:
        """Record computed tokens and sampled ones; returns the requests that advanced."""
        for scheduled in step_input.seqs:
            seq = self._seqs.get(scheduled.seq_id)
            if seq is not None and not seq.finished:
                seq.num_computed_tokens += scheduled.num_tokens
        touched: dict[str, SequenceGroup] = {}
        for sample in step_output.samples:
            seq = self._seqs.get(sample.seq_id)
            if seq is None or seq.finished:  # aborted while the step ran
                continue
            group = self._group_of(seq)
            seq.append_token(sample.token_id, sample.logprob, sample.top_logprobs)
            self._check_stop(seq, group)
            touched[group.request_id] = group
        return list(touched.values())

    def finish_seq(self, seq: Sequence, reason: FinishReason, stop_reason: int | str | None) -> None:
        """Finish one sequence (e.g. on a stop string found after detokenizing)."""
        seq.finish(reason, stop_reason)
        self.block_manager.free(seq.seq_id)

    def free_finished(self, groups: list[SequenceGroup]) -> None:
        for group in groups:
            if group.finished:
                self._retire(group)

    # -- helpers -------------------------------------------------------------
    def _plan(self, group: SequenceGroup, budget: int) -> list[tuple[Sequence, int]]:
        plan = []
        for seq in group.unfinished_seqs:
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            if num_tokens == 0:
                break
            plan.append((seq, num_tokens))
            budget -= num_tokens
        return plan

    def _fits(self, plan: list[tuple[Sequence, int]], reserve: int = 0) -> bool:
        needed = sum(self.block_manager.blocks_to_append(seq.seq_id, n) for seq, n in plan)
        return needed + reserve <= self.block_manager.num_free_blocks

    def _commit(self, plan: list[tuple[Sequence, int]], out: list[ScheduledSequence]) -> int:
        manager = self.block_manager
        group_params = self._group_of(plan[0][0]).sampling_params if plan else None
        for seq, num_tokens in plan:
            if manager.has(seq.seq_id):
                manager.append_slots(seq.seq_id, num_tokens)
            else:
                manager.allocate(seq.seq_id, num_tokens)
            start = seq.num_computed_tokens
            do_sample = start + num_tokens == seq.num_tokens
            penalties = do_sample and group_params.uses_penalties
            out.append(ScheduledSequence(
                seq_id=seq.seq_id,
                token_ids=seq.token_ids[start:start + num_tokens],
                start_pos=start,
                block_table=list(manager.block_table(seq.seq_id)),  # a snapshot, not the live list
                do_sample=do_sample,
                sampling_params=group_params if do_sample else None,
                output_index=seq.num_output_tokens,
                prompt_token_ids=seq.prompt_token_ids if penalties else None,
                output_token_ids=seq.output_token_ids if penalties else None,
            ))
        return sum(n for _, n in plan)

    def _preempt(self, group: SequenceGroup) -> None:
        for seq in group.unfinished_seqs:
            self.block_manager.free(seq.seq_id)
            seq.reset_for_recompute()
        self.waiting.appendleft(group)
        self.num_preemptions += 1

    def _check_stop(self, seq: Sequence, group: SequenceGroup) -> None:
        params = group.sampling_params
        token = seq.token_ids[-1]
        if not params.ignore_eos and token in self.config.eos_token_ids:
            self.finish_seq(seq, FinishReason.STOP, None)
        elif token in params.stop_token_ids:
            self.finish_seq(seq, FinishReason.STOP, token)
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.config.max_model_len:
            self.finish_seq(seq, FinishReason.LENGTH, None)

    def _retire(self, group: SequenceGroup) -> None:
        for seq in group.seqs:
            self.block_manager.free(seq.seq_id)
            self._seqs.pop(seq.seq_id, None)
            self._seq_group.pop(seq.seq_id, None)
        self._groups.pop(group.request_id, None)
        if group in self.running:
            self.running.remove(group)
        elif group in self.waiting:
            self.waiting.remove(group)

    def _group_of(self, seq: Sequence) -> SequenceGroup:
        return self._seq_group[seq.seq_id]
