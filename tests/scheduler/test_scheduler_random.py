"""Scheduler under random workloads, tiny pools and random aborts: it always drains cleanly."""

from __future__ import annotations

import pickle
import random

import pytest
from support.scheduler_harness import VOCAB, Harness, scheduled_ids

from pagedserve.math_utils import cdiv
from pagedserve.scheduler import scheduler as scheduler_module
from pagedserve.scheduler.scheduler import Scheduler
from pagedserve.scheduler.sequence import FinishReason, SequenceStatus
from pagedserve.scheduler.step import StepInput
from pagedserve.worker.step_wire import StepDecoder, StepEncoder

# -- randomized driver --------------------------------------------------------------------

def _check_step(h: Harness, step_input: StepInput, budget: int, max_num_seqs: int) -> None:
    bm, sched = h.bm, h.sched
    assert step_input.num_tokens <= budget
    ids = scheduled_ids(step_input)
    assert len(ids) == len(set(ids)), "a sequence was scheduled twice in one step"
    assert len(ids) <= max_num_seqs
    assert sched.num_running_seqs <= max_num_seqs
    assert 0 <= bm.num_allocated_blocks <= bm.num_blocks
    seqs = {seq.seq_id: seq for g in sched.running for seq in g.seqs}
    for s in step_input.seqs:
        seq = seqs[s.seq_id]  # every scheduled sequence belongs to a running request
        assert s.context_len == seq.num_computed_tokens  # counted when scheduled
        assert seq.num_pending == int(s.do_sample)
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
    assert not set(owned) & set(bm.pool.free)
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


def _steps_planned(seed: int, monkeypatch, fast: bool) -> list:
    """Every step a random workload's scheduler plans, as plain values."""
    steps = []
    schedule = Scheduler.schedule

    def recorded(self):
        step = schedule(self)
        steps.append(([(s.seq_id, s.token_ids, s.start_pos, list(s.block_table), s.do_sample,
                        s.output_index, s.num_samples, s.last_token_in_flight)
                       for s in step.seqs],
                      step.blocks_to_copy, step.blocks_to_swap_in, step.blocks_to_swap_out))
        return step

    with monkeypatch.context() as patch:
        patch.setattr(Scheduler, "schedule", recorded)
        if not fast:
            patch.setattr(scheduler_module, "schedule_decode", lambda *args: False)
        _run_random(seed)
    return steps


def test_the_decode_fast_path_plans_what_the_full_plan_does(monkeypatch):
    """A decoding sequence scheduled in a few reads gets the step the full plan would give
    it, under preemption, swaps, forks and aborts in tiny pools."""
    taken = []
    fast_path = scheduler_module.schedule_decode

    def counted(*args):
        taken.append(fast_path(*args))
        return taken[-1]

    monkeypatch.setattr(scheduler_module, "schedule_decode", counted)
    for seed in range(30):
        assert _steps_planned(seed, monkeypatch, True) == _steps_planned(seed, monkeypatch, False)
    assert sum(taken) > 500 and not all(taken)


def test_steps_reach_the_ranks_as_scheduled_when_sent_as_changes(monkeypatch):
    """Every step of random workloads (preemption, swaps, forks, aborts, copies on
    write), sent as what changed since the step before (worker/step_wire.py) and
    pickled as Ray sends it, is the step the scheduler planned, sequence by sequence."""
    encoder, decoder = StepEncoder(), StepDecoder()
    schedule = Scheduler.schedule
    counts = {"changes": 0, "whole": 0}

    def sent(self):
        step = schedule(self)
        encoded = encoder.encode(step)
        for entry in encoded.seqs:
            counts["changes" if isinstance(entry, tuple) else "whole"] += 1
        assert decoder.decode(pickle.loads(pickle.dumps(encoded))) == step
        return step

    monkeypatch.setattr(Scheduler, "schedule", sent)
    for seed in range(30):
        _run_random(seed)
    # Most decoding steps go as changes; prompts, forks and returns go whole.
    assert counts["changes"] > 1000 and counts["whole"] > 100
