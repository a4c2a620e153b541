"""Scheduler: stop conditions and their finish reasons."""

from __future__ import annotations

from support.scheduler_harness import Harness, scheduled_ids, seq_of

from pagedserve.scheduler.sequence import FinishReason
from pagedserve.scheduler.step import Sample, StepOutput

# -- stop conditions -------------------------------------------------------------------

def test_eos_stops():
    h = Harness(eos_token_ids=[2, 3])
    g = h.add("a", 3, max_tokens=10)
    seq = seq_of(g)
    h.step({seq.seq_id: 9})
    h.step({seq.seq_id: 3})
    assert seq.finished and seq.finish_reason is FinishReason.STOP and seq.stop_reason is None
    assert seq.output_token_ids == [9, 3]
    assert not h.sched.has_unfinished() and h.bm.num_free_blocks == h.bm.num_blocks


def test_ignore_eos_continues_past_eos():
    h = Harness(eos_token_ids=[2])
    g = h.add("a", 3, max_tokens=4, ignore_eos=True)
    seq = seq_of(g)
    for _ in range(4):
        h.step({seq.seq_id: 2})
    assert seq.output_token_ids == [2, 2, 2, 2]
    assert seq.finish_reason is FinishReason.LENGTH


def test_stop_token_ids_stop_with_reason():
    h = Harness(eos_token_ids=[2])
    g = h.add("a", 3, max_tokens=10, stop_token_ids=[17, 18])
    seq = seq_of(g)
    h.step({seq.seq_id: 5})
    assert not seq.finished
    h.step({seq.seq_id: 18})
    assert seq.finish_reason is FinishReason.STOP and seq.stop_reason == 18
    assert seq.output_token_ids == [5, 18]


def test_stop_token_ids_apply_with_ignore_eos():
    h = Harness(eos_token_ids=[2])
    g = h.add("a", 3, max_tokens=10, ignore_eos=True, stop_token_ids=[2])
    seq = seq_of(g)
    h.step({seq.seq_id: 2})
    assert seq.finish_reason is FinishReason.STOP and seq.stop_reason == 2


def test_stop_token_wins_over_length_on_the_last_token():
    h = Harness()
    g = h.add("a", 3, max_tokens=2, stop_token_ids=[8])
    seq = seq_of(g)
    h.step({seq.seq_id: 5})
    h.step({seq.seq_id: 8})
    assert seq.finish_reason is FinishReason.STOP and seq.stop_reason == 8


def test_max_tokens_stops_with_length():
    h = Harness()
    g = h.add("a", 3, max_tokens=3)
    seq = seq_of(g)
    steps = h.run_to_completion()
    assert len(steps) == 3
    assert seq.num_output_tokens == 3
    assert seq.finish_reason is FinishReason.LENGTH and seq.stop_reason is None


def test_max_model_len_stops_with_length():
    h = Harness(max_model_len=10)
    g = h.add("a", 8, max_tokens=100)
    seq = seq_of(g)
    h.run_to_completion()
    assert seq.num_tokens == 10 and seq.num_output_tokens == 2
    assert seq.finish_reason is FinishReason.LENGTH


def test_prompt_of_max_model_len_gets_one_token():
    h = Harness(max_model_len=8)
    g = h.add("a", 8, max_tokens=5)
    h.run_to_completion()
    assert seq_of(g).num_output_tokens == 1 and seq_of(g).finish_reason is FinishReason.LENGTH


def test_finished_sequence_frees_blocks_immediately():
    h = Harness(block_size=4)
    g = h.add("a", 6, max_tokens=1)
    step_input = h.schedule()
    assert h.bm.num_allocated_blocks == 2
    advanced = h.sched.update(step_input, StepOutput([Sample(seq_of(g).seq_id, 7, 0.0)]))
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
    assert scheduled_ids(step_input) == [s1.seq_id]
    h.run_to_completion()
    assert s1.output_token_ids == [4, 4, 7] and s1.finish_reason is FinishReason.LENGTH
    assert h.bm.num_free_blocks == h.bm.num_blocks
