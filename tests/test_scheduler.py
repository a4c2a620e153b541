"""Scheduler with a fake executor: admission, token budget, preemption, stops, abort."""

from __future__ import annotations

import itertools
import random

import pytest

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.block_manager import BlockManager, cdiv
from pagedserve.scheduler.scheduler import Scheduler, SchedulerConfig
from pagedserve.scheduler.sequence import FinishReason, Sequence, SequenceGroup, SequenceStatus
from pagedserve.scheduler.step import Sample, StepInput, StepOutput

VOCAB = 50


class Harness:
    """A scheduler, its block manager and a fake executor that samples what it is told."""

    def __init__(self, *, num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                 max_model_len=256, eos_token_ids=(), watermark_blocks=0):
        self.bm = BlockManager(num_blocks, block_size, watermark_blocks=watermark_blocks)
        self.sched = Scheduler(SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len, eos_token_ids=frozenset(eos_token_ids)), self.bm)
        self._seq_ids = itertools.count()
        self.groups: dict[str, SequenceGroup] = {}

    def add(self, request_id: str, prompt, **params) -> SequenceGroup:
        if isinstance(prompt, int):
            prompt = [10 + i % 30 for i in range(prompt)]
        sp = SamplingParams(**params)
        seqs = [Sequence(next(self._seq_ids), list(prompt)) for _ in range(sp.best_of)]
        group = SequenceGroup(request_id, seqs, sp)
        self.sched.add(group)
        self.groups[request_id] = group
        return group

    def schedule(self) -> StepInput:
        return self.sched.schedule()

    def finish_step(self, step_input: StepInput, tokens=None) -> list[SequenceGroup]:
        """Sample for every do_sample sequence (token from `tokens[seq_id]` or a default)."""
        tokens = tokens or {}
        samples = [Sample(s.seq_id, tokens.get(s.seq_id, 7), -0.25)
                   for s in step_input.seqs if s.do_sample]
        advanced = self.sched.update(step_input, StepOutput(samples))
        self.sched.free_finished(advanced)
        return advanced

    def step(self, tokens=None) -> StepInput:
        step_input = self.schedule()
        self.finish_step(step_input, tokens)
        return step_input

    def run_to_completion(self, max_steps=1000) -> list[StepInput]:
        steps = []
        while self.sched.has_unfinished():
            steps.append(self.step())
            assert len(steps) < max_steps, "the scheduler made no progress"
        return steps


def _ids(step_input: StepInput) -> list[int]:
    return [s.seq_id for s in step_input.seqs]


def _seq(group: SequenceGroup, i: int = 0) -> Sequence:
    return group.seqs[i]


# -- admission --------------------------------------------------------------------

def test_single_request_prefill_then_decode():
    h = Harness(block_size=4)
    g = h.add("a", [1, 2, 3, 4, 5], max_tokens=3, ignore_eos=True)
    seq = _seq(g)
    first = h.schedule()
    assert len(first.seqs) == 1
    s = first.seqs[0]
    assert s.seq_id == seq.seq_id and s.token_ids == [1, 2, 3, 4, 5] and s.start_pos == 0
    assert s.do_sample and s.output_index == 0 and s.sampling_params is g.sampling_params
    assert len(s.block_table) == 2 and s.block_table == h.bm.block_table(seq.seq_id)
    assert seq.status is SequenceStatus.RUNNING
    h.finish_step(first, {seq.seq_id: 42})
    assert seq.num_computed_tokens == 5 and seq.output_token_ids == [42]
    assert seq.cumulative_logprob == pytest.approx(-0.25)

    decode = h.schedule()
    d = decode.seqs[0]
    assert d.token_ids == [42] and d.start_pos == 5 and d.do_sample and d.output_index == 1
    h.finish_step(decode, {seq.seq_id: 43})
    h.step({seq.seq_id: 44})
    assert seq.output_token_ids == [42, 43, 44]
    assert seq.finished and seq.finish_reason is FinishReason.LENGTH
    assert not h.sched.has_unfinished()
    assert h.bm.num_free_blocks == h.bm.num_blocks
    assert h.schedule().is_empty


def test_fcfs_admission_under_max_num_seqs():
    h = Harness(max_num_seqs=2)
    a = h.add("a", 3, max_tokens=2, ignore_eos=True)
    b = h.add("b", 3, max_tokens=4, ignore_eos=True)
    c = h.add("c", 3, max_tokens=1, ignore_eos=True)
    first = h.step()
    assert _ids(first) == [_seq(a).seq_id, _seq(b).seq_id]
    assert list(h.sched.waiting) == [c]
    second = h.step()  # a finishes here
    assert _ids(second) == [_seq(a).seq_id, _seq(b).seq_id]
    assert _seq(a).finished
    third = h.step()
    # b decodes first, then c (the oldest waiting request) is admitted.
    assert _ids(third) == [_seq(b).seq_id, _seq(c).seq_id]
    assert third.seqs[1].start_pos == 0 and third.seqs[1].num_tokens == 3


def test_fcfs_head_of_line_is_not_skipped():
    """A waiting request that does not fit blocks the ones behind it, even small ones."""
    h = Harness(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    a = h.add("a", 8, max_tokens=5, ignore_eos=True)  # 2 blocks
    big = h.add("big", 12, max_tokens=1, ignore_eos=True)  # 3 blocks: does not fit next to a
    small = h.add("small", 2, max_tokens=1, ignore_eos=True)  # 1 block: would fit
    first = h.step()
    assert _ids(first) == [_seq(a).seq_id]
    assert list(h.sched.waiting) == [big, small]
    assert not h.bm.has(_seq(small).seq_id)
    h.run_to_completion()
    assert all(g.finished for g in (a, big, small))


def test_waiting_admitted_in_arrival_order():
    h = Harness(max_num_seqs=1)
    groups = [h.add(f"r{i}", 2 + i, max_tokens=2, ignore_eos=True) for i in range(4)]
    first_scheduled = []
    while h.sched.has_unfinished():
        step_input = h.step()
        for s in step_input.seqs:
            if s.start_pos == 0:
                first_scheduled.append(s.seq_id)
        assert h.sched.num_running_seqs <= 1
    assert first_scheduled == [_seq(g).seq_id for g in groups]


def test_duplicate_request_id_rejected():
    h = Harness()
    h.add("a", 3)
    with pytest.raises(ValueError, match="a"):
        h.add("a", 4)


# -- token budget / chunked prefill -------------------------------------------------

def test_long_prompt_is_chunked_and_only_last_chunk_samples():
    h = Harness(num_blocks=32, block_size=4, max_num_batched_tokens=16)
    prompt = list(range(1, 41))
    g = h.add("long", prompt, max_tokens=2, ignore_eos=True)
    seq = _seq(g)
    chunks = []
    for _ in range(3):
        step_input = h.schedule()
        assert step_input.num_tokens <= 16
        (s,) = step_input.seqs
        chunks.append(s)
        assert len(s.block_table) == cdiv(s.start_pos + s.num_tokens, 4)
        h.finish_step(step_input)
        assert seq.num_computed_tokens == s.start_pos + s.num_tokens
    assert [(c.start_pos, c.num_tokens) for c in chunks] == [(0, 16), (16, 16), (32, 8)]
    assert [c.do_sample for c in chunks] == [False, False, True]
    assert [c.sampling_params is None for c in chunks] == [True, True, False]
    assert sum((c.token_ids for c in chunks), []) == prompt
    assert seq.num_output_tokens == 1  # only the last chunk sampled


def test_budget_respected_every_step_and_shared():
    h = Harness(num_blocks=64, block_size=4, max_num_batched_tokens=10, max_num_seqs=8)
    for i, n in enumerate([7, 13, 4, 25, 1, 9]):
        h.add(f"r{i}", n, max_tokens=4, ignore_eos=True)
    steps = h.run_to_completion()
    assert all(0 < s.num_tokens <= 10 for s in steps)
    # While prompts are pending the budget is used to the full.
    assert steps[0].num_tokens == 10
    assert all(h.groups[f"r{i}"].seqs[0].num_output_tokens == 4 for i in range(6))


def test_budget_of_one_token():
    h = Harness(max_num_batched_tokens=1)
    a = h.add("a", 3, max_tokens=2, ignore_eos=True)
    b = h.add("b", 2, max_tokens=2, ignore_eos=True)
    steps = h.run_to_completion()
    assert all(s.num_tokens == 1 for s in steps)
    assert _seq(a).num_output_tokens == 2 and _seq(b).num_output_tokens == 2


def test_max_num_seqs_respected():
    h = Harness(num_blocks=128, max_num_seqs=3, max_num_batched_tokens=100)
    for i in range(7):
        h.add(f"r{i}", 3 + i, max_tokens=1 + i % 4, ignore_eos=True)
    while h.sched.has_unfinished():
        step_input = h.step()
        assert len(step_input.seqs) <= 3
        assert h.sched.num_running_seqs <= 3


def test_max_num_seqs_counts_best_of_sequences():
    h = Harness(num_blocks=64, max_num_seqs=3)
    a = h.add("a", 4, n=2, max_tokens=3, ignore_eos=True)
    b = h.add("b", 4, n=2, max_tokens=3, ignore_eos=True)
    first = h.schedule()
    assert _ids(first) == [s.seq_id for s in a.seqs]
    assert list(h.sched.waiting) == [b]


def test_running_decodes_are_scheduled_before_new_prompts():
    h = Harness(num_blocks=64, block_size=4, max_num_batched_tokens=8)
    a = h.add("a", 3, max_tokens=10, ignore_eos=True)
    b = h.add("b", 2, max_tokens=10, ignore_eos=True)
    h.step()  # both prompts computed
    c = h.add("c", 20, max_tokens=2, ignore_eos=True)
    step_input = h.schedule()
    assert _ids(step_input) == [_seq(a).seq_id, _seq(b).seq_id, _seq(c).seq_id]
    assert [s.num_tokens for s in step_input.seqs] == [1, 1, 6]
    assert [s.do_sample for s in step_input.seqs] == [True, True, False]
    h.finish_step(step_input)
    # Still chunking c: the decodes keep going first, every step.
    step_input = h.schedule()
    assert _ids(step_input) == [_seq(a).seq_id, _seq(b).seq_id, _seq(c).seq_id]
    assert [s.num_tokens for s in step_input.seqs] == [1, 1, 6]
    assert step_input.seqs[2].start_pos == 6


def test_budget_exhausted_by_running_admits_nothing():
    h = Harness(max_num_batched_tokens=2)
    h.add("a", 1, max_tokens=5, ignore_eos=True)
    h.add("b", 1, max_tokens=5, ignore_eos=True)
    h.step()
    c = h.add("c", 1, max_tokens=5, ignore_eos=True)
    step_input = h.step()
    assert step_input.num_tokens == 2 and list(h.sched.waiting) == [c]
    assert not h.bm.has(_seq(c).seq_id)


def test_watermark_applies_only_with_running_requests():
    h = Harness(num_blocks=4, block_size=4, watermark_blocks=1)
    # Alone, a request may fill the whole pool.
    a = h.add("a", 16, max_tokens=1, ignore_eos=True)
    assert _ids(h.schedule()) == [_seq(a).seq_id]
    assert h.bm.num_free_blocks == 0

    h2 = Harness(num_blocks=4, block_size=4, watermark_blocks=1)
    b = h2.add("b", 4, max_tokens=20, ignore_eos=True)  # 1 block
    c = h2.add("c", 12, max_tokens=1, ignore_eos=True)  # 3 blocks: would leave 0 < watermark
    first = h2.schedule()
    assert _ids(first) == [_seq(b).seq_id]
    assert list(h2.sched.waiting) == [c]


# -- preemption -----------------------------------------------------------------------

def test_newest_running_request_is_preempted_and_recomputed():
    h = Harness(num_blocks=2, block_size=4, max_num_batched_tokens=64)
    a = h.add("a", [1, 2, 3, 4], max_tokens=3, ignore_eos=True)  # next token needs block 2
    b = h.add("b", [5, 6], max_tokens=3, ignore_eos=True)
    sa, sb = _seq(a), _seq(b)
    h.step({sa.seq_id: 11, sb.seq_id: 21})
    assert h.bm.num_free_blocks == 0
    c = h.add("c", [9], max_tokens=1, ignore_eos=True)

    step_input = h.schedule()
    # a (oldest) needed a block: b (newest) gave its block up.
    assert _ids(step_input) == [sa.seq_id]
    assert h.sched.num_preemptions == 1
    assert not h.bm.has(sb.seq_id)
    assert sb.status is SequenceStatus.WAITING and sb.num_computed_tokens == 0
    assert sb.output_token_ids == [21]  # generated tokens are kept
    assert list(h.sched.waiting) == [b, c]  # to the front, ahead of c
    assert h.sched.running == [a]
    h.finish_step(step_input, {sa.seq_id: 12})

    # b is recomputed from its prompt and the token it had generated.
    recomputed = None
    while h.sched.has_unfinished():
        step_input = h.schedule()
        for s in step_input.seqs:
            if s.seq_id == sb.seq_id and recomputed is None:
                recomputed = s
        h.finish_step(step_input, {sb.seq_id: 22})
    assert recomputed is not None
    assert recomputed.start_pos == 0 and recomputed.token_ids == [5, 6, 21]
    assert recomputed.do_sample and recomputed.output_index == 1
    assert sb.output_token_ids == [21, 22, 22]
    assert sa.output_token_ids[:2] == [11, 12] and sa.num_output_tokens == 3
    assert c.finished and _seq(c).num_output_tokens == 1
    assert h.bm.num_free_blocks == 2


def test_preemption_picks_newest_of_several():
    h = Harness(num_blocks=3, block_size=2, max_num_batched_tokens=64)
    a = h.add("a", 2, max_tokens=5, ignore_eos=True)  # 1 block, needs a 2nd for its output
    b = h.add("b", 1, max_tokens=5, ignore_eos=True)
    c = h.add("c", 1, max_tokens=5, ignore_eos=True)
    h.step()
    assert h.bm.num_free_blocks == 0 and h.sched.running == [a, b, c]
    step_input = h.schedule()
    # Only c had to go: a gets its block, b still has room in its own.
    assert _ids(step_input) == [_seq(a).seq_id, _seq(b).seq_id]
    assert h.sched.running == [a, b] and list(h.sched.waiting) == [c]
    assert _seq(c).num_computed_tokens == 0 and not h.bm.has(_seq(c).seq_id)


def test_several_preemptions_keep_arrival_order_in_waiting():
    h = Harness(num_blocks=3, block_size=2, max_num_batched_tokens=64)
    a = h.add("a", 2, max_tokens=5, ignore_eos=True)
    b = h.add("b", 2, max_tokens=5, ignore_eos=True)
    c = h.add("c", 2, max_tokens=5, ignore_eos=True)
    h.step()
    d = h.add("d", 1, max_tokens=1, ignore_eos=True)
    # Everyone needs a new block, none is free: c, then b are preempted for a.
    step_input = h.schedule()
    assert _ids(step_input) == [_seq(a).seq_id]
    assert h.sched.num_preemptions == 2
    assert list(h.sched.waiting) == [b, c, d]


def test_preempted_request_finishes_later():
    h = Harness(num_blocks=3, block_size=2, max_num_batched_tokens=64)
    a = h.add("a", 2, max_tokens=3, ignore_eos=True)
    b = h.add("b", 2, max_tokens=3, ignore_eos=True)
    h.step()
    step_input = h.schedule()
    # a takes the last block; b, the newest, finds none and preempts itself.
    assert _ids(step_input) == [_seq(a).seq_id]
    assert list(h.sched.waiting) == [b] and h.sched.num_preemptions == 1
    h.finish_step(step_input)
    h.run_to_completion()
    assert _seq(a).num_output_tokens == 3 and _seq(b).num_output_tokens == 3
    assert h.bm.num_free_blocks == 3


def test_nothing_admitted_in_a_step_that_preempted():
    h = Harness(num_blocks=3, block_size=4, max_num_batched_tokens=5)
    a = h.add("a", 4, max_tokens=4, ignore_eos=True)
    h.step()  # a: 1 block
    b = h.add("b", 4, max_tokens=4, ignore_eos=True)
    h.step()  # a takes its 2nd block, b its 1st: the pool is full
    assert h.bm.num_free_blocks == 0
    c = h.add("c", 1, max_tokens=1, ignore_eos=True)
    step_input = h.schedule()
    # a fits, b needs a block and is preempted. Its freed block would hold the
    # 4-token chunk of b (or c) the 4 tokens of budget left allow, but a step
    # that preempted admits nobody.
    assert h.sched.num_preemptions == 1
    assert _ids(step_input) == [_seq(a).seq_id] and step_input.num_tokens == 1
    assert list(h.sched.waiting) == [b, c]
    assert h.bm.num_free_blocks == 1
    assert not h.bm.has(_seq(b).seq_id) and not h.bm.has(_seq(c).seq_id)
    assert _seq(b).status is SequenceStatus.WAITING and _seq(c).status is SequenceStatus.WAITING
    h.finish_step(step_input)
    h.run_to_completion()
    assert [g.seqs[0].num_output_tokens for g in (a, b, c)] == [4, 4, 1]


def test_preempted_chunked_prefill_restarts_from_zero():
    h = Harness(num_blocks=4, block_size=4, max_num_batched_tokens=6)
    a = h.add("a", 4, max_tokens=8, ignore_eos=True)
    b = h.add("b", 12, max_tokens=1, ignore_eos=True)
    h.step()  # a: 4 tokens, b: 2 of 12
    assert _seq(b).num_computed_tokens == 2
    for _ in range(20):
        h.step()
        if h.sched.num_preemptions:
            break
    assert h.sched.num_preemptions >= 1
    # Whatever got preempted lost all its computed tokens.
    for group in h.sched.waiting:
        for seq in group.unfinished_seqs:
            assert seq.num_computed_tokens == 0 and not h.bm.has(seq.seq_id)
    h.run_to_completion()
    assert _seq(a).num_output_tokens == 8 and _seq(b).num_output_tokens == 1
    assert h.bm.num_free_blocks == 4


# -- stop conditions -------------------------------------------------------------------

def test_eos_stops():
    h = Harness(eos_token_ids=[2, 3])
    g = h.add("a", 3, max_tokens=10)
    seq = _seq(g)
    h.step({seq.seq_id: 9})
    h.step({seq.seq_id: 3})
    assert seq.finished and seq.finish_reason is FinishReason.STOP and seq.stop_reason is None
    assert seq.output_token_ids == [9, 3]
    assert not h.sched.has_unfinished() and h.bm.num_free_blocks == h.bm.num_blocks


def test_ignore_eos_continues_past_eos():
    h = Harness(eos_token_ids=[2])
    g = h.add("a", 3, max_tokens=4, ignore_eos=True)
    seq = _seq(g)
    for _ in range(4):
        h.step({seq.seq_id: 2})
    assert seq.output_token_ids == [2, 2, 2, 2]
    assert seq.finish_reason is FinishReason.LENGTH


def test_stop_token_ids_stop_with_reason():
    h = Harness(eos_token_ids=[2])
    g = h.add("a", 3, max_tokens=10, stop_token_ids=[17, 18])
    seq = _seq(g)
    h.step({seq.seq_id: 5})
    assert not seq.finished
    h.step({seq.seq_id: 18})
    assert seq.finish_reason is FinishReason.STOP and seq.stop_reason == 18
    assert seq.output_token_ids == [5, 18]


def test_stop_token_ids_apply_with_ignore_eos():
    h = Harness(eos_token_ids=[2])
    g = h.add("a", 3, max_tokens=10, ignore_eos=True, stop_token_ids=[2])
    seq = _seq(g)
    h.step({seq.seq_id: 2})
    assert seq.finish_reason is FinishReason.STOP and seq.stop_reason == 2


def test_stop_token_wins_over_length_on_the_last_token():
    h = Harness()
    g = h.add("a", 3, max_tokens=2, stop_token_ids=[8])
    seq = _seq(g)
    h.step({seq.seq_id: 5})
    h.step({seq.seq_id: 8})
    assert seq.finish_reason is FinishReason.STOP and seq.stop_reason == 8


def test_max_tokens_stops_with_length():
    h = Harness()
    g = h.add("a", 3, max_tokens=3)
    seq = _seq(g)
    steps = h.run_to_completion()
    assert len(steps) == 3
    assert seq.num_output_tokens == 3
    assert seq.finish_reason is FinishReason.LENGTH and seq.stop_reason is None


def test_max_model_len_stops_with_length():
    h = Harness(max_model_len=10)
    g = h.add("a", 8, max_tokens=100)
    seq = _seq(g)
    h.run_to_completion()
    assert seq.num_tokens == 10 and seq.num_output_tokens == 2
    assert seq.finish_reason is FinishReason.LENGTH


def test_prompt_of_max_model_len_gets_one_token():
    h = Harness(max_model_len=8)
    g = h.add("a", 8, max_tokens=5)
    h.run_to_completion()
    assert _seq(g).num_output_tokens == 1 and _seq(g).finish_reason is FinishReason.LENGTH


def test_finished_sequence_frees_blocks_immediately():
    h = Harness(block_size=4)
    g = h.add("a", 6, max_tokens=1)
    step_input = h.schedule()
    assert h.bm.num_allocated_blocks == 2
    advanced = h.sched.update(step_input, StepOutput([Sample(_seq(g).seq_id, 7, 0.0)]))
    assert advanced == [g] and g.finished
    assert h.bm.num_allocated_blocks == 0  # freed by finish, before free_finished
    h.sched.free_finished(advanced)
    assert not h.sched.has_unfinished() and h.sched.running == []


def test_best_of_sequences_finish_independently():
    h = Harness()
    g = h.add("a", 3, n=2, max_tokens=3, stop_token_ids=[9])
    s0, s1 = g.seqs
    h.step({s0.seq_id: 9, s1.seq_id: 4})
    assert s0.finished and not s1.finished and not g.finished
    assert not h.bm.has(s0.seq_id) and h.bm.has(s1.seq_id)
    step_input = h.step({s1.seq_id: 4})
    assert _ids(step_input) == [s1.seq_id]
    h.run_to_completion()
    assert s1.output_token_ids == [4, 4, 7] and s1.finish_reason is FinishReason.LENGTH
    assert h.bm.num_free_blocks == h.bm.num_blocks


# -- abort -----------------------------------------------------------------------------

def test_abort_waiting_request():
    h = Harness(max_num_seqs=1)
    a = h.add("a", 3, max_tokens=5)
    b = h.add("b", 3, max_tokens=5)
    h.step()
    assert list(h.sched.waiting) == [b]
    assert h.sched.abort("b") is b
    assert list(h.sched.waiting) == []
    assert _seq(b).finish_reason is FinishReason.ABORT
    assert h.sched.running == [a]


def test_abort_running_request_frees_every_block():
    h = Harness(num_blocks=16, block_size=2)
    a = h.add("a", 7, n=3, max_tokens=5)
    other = h.add("other", 3, max_tokens=5)
    h.step()
    held = {s.seq_id: len(h.bm.block_table(s.seq_id)) for s in a.seqs}
    assert sum(held.values()) == 12
    free_before = h.bm.num_free_blocks
    assert h.sched.abort("a") is a
    assert h.bm.num_free_blocks == free_before + 12
    assert all(not h.bm.has(s.seq_id) for s in a.seqs)
    assert all(s.finish_reason is FinishReason.ABORT for s in a.seqs)
    assert h.sched.running == [other]
    h.sched.abort("other")
    assert h.bm.num_free_blocks == 16 and h.bm.num_stored_tokens() == 0
    assert not h.sched.has_unfinished()


def test_abort_between_schedule_and_update():
    h = Harness()
    a = h.add("a", 5, max_tokens=5)
    b = h.add("b", 5, max_tokens=5)
    step_input = h.schedule()
    h.sched.abort("a")
    advanced = h.finish_step(step_input)
    assert advanced == [b]
    assert _seq(a).num_output_tokens == 0 and _seq(a).finish_reason is FinishReason.ABORT
    assert not h.bm.has(_seq(a).seq_id)


def test_abort_preempted_request():
    h = Harness(num_blocks=2, block_size=2, max_num_batched_tokens=64)
    h.add("a", 2, max_tokens=3, ignore_eos=True)  # 4 slots at most: fits the pool alone
    b = h.add("b", 2, max_tokens=3, ignore_eos=True)
    h.step()
    h.step()  # b is preempted
    assert list(h.sched.waiting) == [b]
    h.sched.abort("b")
    assert not h.sched.waiting
    h.run_to_completion()
    assert h.bm.num_free_blocks == 2


def test_abort_unknown_or_twice():
    h = Harness()
    assert h.sched.abort("nope") is None
    h.add("a", 3)
    h.step()
    assert h.sched.abort("a") is not None
    assert h.sched.abort("a") is None
    assert h.bm.num_free_blocks == h.bm.num_blocks


def test_abort_keeps_finish_reason_of_finished_sequences():
    h = Harness()
    g = h.add("a", 3, n=2, max_tokens=4, stop_token_ids=[9])
    s0, s1 = g.seqs
    h.step({s0.seq_id: 9, s1.seq_id: 1})
    h.sched.abort("a")
    assert s0.finish_reason is FinishReason.STOP and s1.finish_reason is FinishReason.ABORT
    assert h.bm.num_free_blocks == h.bm.num_blocks


# -- randomized driver --------------------------------------------------------------------

def _check_step(h: Harness, step_input: StepInput, budget: int, max_num_seqs: int) -> None:
    bm, sched = h.bm, h.sched
    assert step_input.num_tokens <= budget
    ids = _ids(step_input)
    assert len(ids) == len(set(ids)), "a sequence was scheduled twice in one step"
    assert len(ids) <= max_num_seqs
    assert sched.num_running_seqs <= max_num_seqs
    assert 0 <= bm.num_allocated_blocks <= bm.num_blocks
    seqs = {seq.seq_id: seq for g in sched.running for seq in g.seqs}
    for s in step_input.seqs:
        seq = seqs[s.seq_id]  # every scheduled sequence belongs to a running request
        assert s.start_pos == seq.num_computed_tokens
        assert s.num_tokens > 0
        assert s.token_ids == seq.token_ids[s.start_pos:s.context_len]
        assert s.do_sample == (s.context_len == seq.num_tokens)
        assert (s.sampling_params is not None) == s.do_sample
        assert s.output_index == seq.num_output_tokens
        assert bm.num_slots(s.seq_id) == s.context_len
        assert len(s.block_table) == cdiv(s.context_len, bm.block_size)
    # No physical block is in two tables; the tables and the free list partition the pool.
    owned = [b for t in bm._tables.values() for b in t]
    assert len(owned) == len(set(owned))
    assert len(owned) + bm.num_free_blocks == bm.num_blocks
    assert not set(owned) & set(bm._free)
    # Waiting requests hold no blocks and have nothing computed.
    for group in sched.waiting:
        for seq in group.seqs:
            assert not bm.has(seq.seq_id)
            if not seq.finished:
                assert seq.num_computed_tokens == 0 and seq.status is SequenceStatus.WAITING


def _run_random(seed: int) -> int:
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    max_model_len = rng.choice([16, 24, 32])
    max_best_of = rng.choice([1, 1, 2])
    min_blocks = max_best_of * cdiv(max_model_len, block_size)
    num_blocks = min_blocks + rng.choice([0, 1, 2, min_blocks])  # mostly tiny: preemptions
    budget = rng.randint(1, 40)
    max_num_seqs = rng.randint(max_best_of, 6)
    h = Harness(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                max_num_batched_tokens=budget, max_model_len=max_model_len,
                eos_token_ids=(0, 1), watermark_blocks=rng.randint(0, 2))
    num_requests = rng.randint(1, 16)
    pending = []
    for i in range(num_requests):
        prompt_len = rng.randint(1, max_model_len - 1)
        max_tokens = rng.randint(1, max_model_len - prompt_len)
        prompt = [rng.randrange(VOCAB) for _ in range(prompt_len)]
        pending.append((f"r{i}", prompt, max_tokens, rng.randint(1, max_best_of)))
    aborted: set[str] = set()
    sampled: dict[int, list[int]] = {}
    arrivals = sorted(rng.randint(0, 10) for _ in pending)

    step = 0
    while pending or h.sched.has_unfinished():
        while pending and arrivals[0] <= step:
            arrivals.pop(0)
            request_id, prompt, max_tokens, best_of = pending.pop(0)
            h.add(request_id, prompt, max_tokens=max_tokens, n=best_of, ignore_eos=True)
        if h.groups and rng.random() < 0.05:
            victim = rng.choice(sorted(h.groups))
            if not h.groups[victim].finished:
                aborted.add(victim)
            h.sched.abort(victim)
        step_input = h.schedule()
        _check_step(h, step_input, budget, max_num_seqs)
        if rng.random() < 0.03 and h.sched.running:
            victim = h.sched.running[-1].request_id  # aborted while the step "runs"
            aborted.add(victim)
            h.sched.abort(victim)
        tokens = {}
        for s in step_input.seqs:
            if s.do_sample:
                tokens[s.seq_id] = rng.randrange(VOCAB)  # EOS ids included: ignore_eos
        live = h.sched._seqs
        for seq_id, token in tokens.items():
            if seq_id in live and not live[seq_id].finished:  # not aborted meanwhile
                sampled.setdefault(seq_id, []).append(token)
        h.finish_step(step_input, tokens)
        for seq in (seq for g in h.sched.running for seq in g.unfinished_seqs):
            assert h.bm.num_slots(seq.seq_id) == seq.num_computed_tokens
        assert h.bm.num_allocated_blocks <= num_blocks
        step += 1
        assert step < 5000, "no progress"

    assert h.bm.num_free_blocks == num_blocks and h.bm.num_stored_tokens() == 0
    assert not h.bm._tables
    assert not h.sched.waiting and not h.sched.running
    assert not h.sched._seqs and not h.sched._groups
    assert len(h.groups) == num_requests
    for request_id, group in h.groups.items():
        assert group.finished
        for seq in group.seqs:
            if request_id in aborted and seq.finish_reason is FinishReason.ABORT:
                continue
            assert seq.finish_reason is FinishReason.LENGTH, (request_id, seq.finish_reason)
            assert seq.num_output_tokens == group.sampling_params.max_tokens
            # Recompute after preemption neither loses nor repeats a sampled token.
            assert seq.output_token_ids == sampled[seq.seq_id]
    return h.sched.num_preemptions


@pytest.mark.parametrize("seed", range(60))
def test_random_workload_drains_cleanly(seed):
    _run_random(seed)


def test_random_workloads_do_preempt():
    """The random driver really exercises preemption (else it proves little)."""
    assert sum(_run_random(seed) for seed in range(60)) > 0
