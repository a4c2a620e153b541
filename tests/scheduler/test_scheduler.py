"""Scheduler: FCFS admission, the token budget (chunked prefill) and max_num_seqs."""

from __future__ import annotations

import pytest
from support.scheduler_harness import Harness, scheduled_ids, seq_of

from pagedserve.math_utils import cdiv
from pagedserve.scheduler.sequence import FinishReason, SequenceStatus

# -- admission --------------------------------------------------------------------

def test_single_request_prefill_then_decode():
    h = Harness(block_size=4)
    g = h.add("a", [1, 2, 3, 4, 5], max_tokens=3, ignore_eos=True)
    seq = seq_of(g)
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
    assert scheduled_ids(first) == [seq_of(a).seq_id, seq_of(b).seq_id]
    assert list(h.sched.waiting) == [c]
    second = h.step()  # a finishes here
    assert scheduled_ids(second) == [seq_of(a).seq_id, seq_of(b).seq_id]
    assert seq_of(a).finished
    third = h.step()
    # b decodes first, then c (the oldest waiting request) is admitted.
    assert scheduled_ids(third) == [seq_of(b).seq_id, seq_of(c).seq_id]
    assert third.seqs[1].start_pos == 0 and third.seqs[1].num_tokens == 3


def test_fcfs_head_of_line_is_not_skipped():
    """A waiting request that does not fit blocks the ones behind it, even small ones."""
    h = Harness(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    a = h.add("a", 8, max_tokens=5, ignore_eos=True)  # 2 blocks
    big = h.add("big", 12, max_tokens=1, ignore_eos=True)  # 3 blocks: does not fit next to a
    small = h.add("small", 2, max_tokens=1, ignore_eos=True)  # 1 block: would fit
    first = h.step()
    assert scheduled_ids(first) == [seq_of(a).seq_id]
    assert list(h.sched.waiting) == [big, small]
    assert not h.bm.has(seq_of(small).seq_id)
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
    assert first_scheduled == [seq_of(g).seq_id for g in groups]


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
    seq = seq_of(g)
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
    assert seq_of(a).num_output_tokens == 2 and seq_of(b).num_output_tokens == 2


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
    assert scheduled_ids(first) == [s.seq_id for s in a.seqs]
    assert list(h.sched.waiting) == [b]


def test_running_decodes_are_scheduled_before_new_prompts():
    h = Harness(num_blocks=64, block_size=4, max_num_batched_tokens=8)
    a = h.add("a", 3, max_tokens=10, ignore_eos=True)
    b = h.add("b", 2, max_tokens=10, ignore_eos=True)
    h.step()  # both prompts computed
    c = h.add("c", 20, max_tokens=2, ignore_eos=True)
    step_input = h.schedule()
    assert scheduled_ids(step_input) == [seq_of(a).seq_id, seq_of(b).seq_id, seq_of(c).seq_id]
    assert [s.num_tokens for s in step_input.seqs] == [1, 1, 6]
    assert [s.do_sample for s in step_input.seqs] == [True, True, False]
    h.finish_step(step_input)
    # Still chunking c: the decodes keep going first, every step.
    step_input = h.schedule()
    assert scheduled_ids(step_input) == [seq_of(a).seq_id, seq_of(b).seq_id, seq_of(c).seq_id]
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
    assert not h.bm.has(seq_of(c).seq_id)


def test_watermark_applies_only_with_running_requests():
    h = Harness(num_blocks=4, block_size=4, watermark_blocks=1)
    # Alone, a request may fill the whole pool.
    a = h.add("a", 16, max_tokens=1, ignore_eos=True)
    assert scheduled_ids(h.schedule()) == [seq_of(a).seq_id]
    assert h.bm.num_free_blocks == 0

    h2 = Harness(num_blocks=4, block_size=4, watermark_blocks=1)
    b = h2.add("b", 4, max_tokens=20, ignore_eos=True)  # 1 block
    c = h2.add("c", 12, max_tokens=1, ignore_eos=True)  # 3 blocks: would leave 0 < watermark
    first = h2.schedule()
    assert scheduled_ids(first) == [seq_of(b).seq_id]
    assert list(h2.sched.waiting) == [c]
