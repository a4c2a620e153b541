"""Scheduler: preemption by recompute, and abort freeing every block."""

from __future__ import annotations

from support.scheduler_harness import Harness, scheduled_ids, seq_of

from pagedserve.scheduler.sequence import FinishReason, SequenceStatus

# -- preemption -----------------------------------------------------------------------

def test_newest_running_request_is_preempted_and_recomputed():
    h = Harness(num_blocks=2, block_size=4, max_num_batched_tokens=64)
    a = h.add("a", [1, 2, 3, 4], max_tokens=3, ignore_eos=True)  # next token needs block 2
    b = h.add("b", [5, 6], max_tokens=3, ignore_eos=True)
    sa, sb = seq_of(a), seq_of(b)
    h.step({sa.seq_id: 11, sb.seq_id: 21})
    assert h.bm.num_free_blocks == 0
    c = h.add("c", [9], max_tokens=1, ignore_eos=True)

    step_input = h.schedule()
    # a (oldest) needed a block: b (newest) gave its block up.
    assert scheduled_ids(step_input) == [sa.seq_id]
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
    assert c.finished and seq_of(c).num_output_tokens == 1
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
    assert scheduled_ids(step_input) == [seq_of(a).seq_id, seq_of(b).seq_id]
    assert h.sched.running == [a, b] and list(h.sched.waiting) == [c]
    assert seq_of(c).num_computed_tokens == 0 and not h.bm.has(seq_of(c).seq_id)


def test_several_preemptions_keep_arrival_order_in_waiting():
    h = Harness(num_blocks=3, block_size=2, max_num_batched_tokens=64)
    a = h.add("a", 2, max_tokens=5, ignore_eos=True)
    b = h.add("b", 2, max_tokens=5, ignore_eos=True)
    c = h.add("c", 2, max_tokens=5, ignore_eos=True)
    h.step()
    d = h.add("d", 1, max_tokens=1, ignore_eos=True)
    # Everyone needs a new block, none is free: c, then b are preempted for a.
    step_input = h.schedule()
    assert scheduled_ids(step_input) == [seq_of(a).seq_id]
    assert h.sched.num_preemptions == 2
    assert list(h.sched.waiting) == [b, c, d]


def test_preempted_request_finishes_later():
    h = Harness(num_blocks=3, block_size=2, max_num_batched_tokens=64)
    a = h.add("a", 2, max_tokens=3, ignore_eos=True)
    b = h.add("b", 2, max_tokens=3, ignore_eos=True)
    h.step()
    step_input = h.schedule()
    # a takes the last block; b, the newest, finds none and preempts itself.
    assert scheduled_ids(step_input) == [seq_of(a).seq_id]
    assert list(h.sched.waiting) == [b] and h.sched.num_preemptions == 1
    h.finish_step(step_input)
    h.run_to_completion()
    assert seq_of(a).num_output_tokens == 3 and seq_of(b).num_output_tokens == 3
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
    assert scheduled_ids(step_input) == [seq_of(a).seq_id] and step_input.num_tokens == 1
    assert list(h.sched.waiting) == [b, c]
    assert h.bm.num_free_blocks == 1
    assert not h.bm.has(seq_of(b).seq_id) and not h.bm.has(seq_of(c).seq_id)
    assert seq_of(b).status is SequenceStatus.WAITING and seq_of(c).status is SequenceStatus.WAITING
    h.finish_step(step_input)
    h.run_to_completion()
    assert [g.seqs[0].num_output_tokens for g in (a, b, c)] == [4, 4, 1]


def test_preempted_chunked_prefill_restarts_from_zero():
    h = Harness(num_blocks=4, block_size=4, max_num_batched_tokens=6)
    a = h.add("a", 4, max_tokens=8, ignore_eos=True)
    b = h.add("b", 12, max_tokens=1, ignore_eos=True)
    h.step()  # a: 4 tokens, b: 2 of 12
    assert seq_of(b).num_computed_tokens == 2
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
    assert seq_of(a).num_output_tokens == 8 and seq_of(b).num_output_tokens == 1
    assert h.bm.num_free_blocks == 4



# -- abort -----------------------------------------------------------------------------

def test_abort_waiting_request():
    h = Harness(max_num_seqs=1)
    a = h.add("a", 3, max_tokens=5)
    b = h.add("b", 3, max_tokens=5)
    h.step()
    assert list(h.sched.waiting) == [b]
    assert h.sched.abort("b") is b
    assert list(h.sched.waiting) == []
    assert seq_of(b).finish_reason is FinishReason.ABORT
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
    assert seq_of(a).num_output_tokens == 0 and seq_of(a).finish_reason is FinishReason.ABORT
    assert not h.bm.has(seq_of(a).seq_id)


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
