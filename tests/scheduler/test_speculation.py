"""Speculation's host side: the switch-off policy, and slots given back after a
verification, on the GPU and for a sequence swapped out while its step ran."""

from __future__ import annotations

import pytest

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.block_manager import BlockManager
from pagedserve.scheduler.config import SchedulerConfig
from pagedserve.scheduler.ngram import PromptLookup
from pagedserve.scheduler.scheduler import Scheduler
from pagedserve.scheduler.sequence import Sequence, SequenceGroup
from pagedserve.scheduler.speculation import MeasuredCost, SpecStats, SpeculationPolicy
from pagedserve.scheduler.step import Sample, StepOutput

LOOKUP = PromptLookup(k=4, min_n=1, max_n=3)


def linear_cost(fixed: float, per_token: float):
    """A device whose step takes `fixed` plus `per_token` for each token computed:
    memory-bound at small batches, compute-bound at large ones."""
    return lambda sequences, drafts, context: fixed + per_token * (sequences + drafts)


def stats(acceptance: float, coverage: float = 1.0) -> SpecStats:
    return SpecStats(recent_acceptance=acceptance, recent_coverage=coverage)


def test_the_draft_length_is_the_one_of_the_highest_token_rate():
    gpu = SpeculationPolicy(LOOKUP, cost=linear_cost(10e-3, 20e-6))
    # Batch 1: four drafts cost next to nothing.
    assert gpu.num_drafts(1, 500, stats(0.6)) == 4
    # Batch 2048: the step takes 51 ms plain and 215 ms with 4 drafts each; drafts
    # kept 60% of the time do not pay for it, nearly always kept they do.
    assert gpu.num_drafts(2048, 500, stats(0.6)) == 0
    assert gpu.num_drafts(2048, 500, stats(0.97)) == 3
    # A device where each token costs a third of the fixed part (a small model on a
    # CPU): only the first drafts, the likeliest kept, pay (2 at 60%: 1.96 tokens in
    # 19 ms against 1 in 13; 1 draft gives 1.6 in 16, 3 give 2.18 in 22).
    cpu = SpeculationPolicy(LOOKUP, cost=linear_cost(10e-3, 3e-3))
    assert cpu.num_drafts(1, 500, stats(0.6)) == 2
    assert cpu.num_drafts(1, 500, stats(0.9)) == 4
    assert cpu.num_drafts(1, 500, stats(0.2)) == 0


def test_now_and_then_a_few_steps_go_the_other_way_to_measure_it():
    """After probe_every steps, then twice as long while the probes change nothing. A
    probe into speculating, where the model says plain, also waits until the model's
    rates say it costs at most probe_share of the time: drafts never kept make a step of
    64 take 12.56 ms for 11.28 ms of tokens, so two such steps cost 10.2 steps' share."""
    policy = SpeculationPolicy(LOOKUP, cost=linear_cost(10e-3, 20e-6), probe_every=8,
                               probe_len=2)
    low, high = stats(0.0), stats(0.6)
    assert policy.modelled_wait(64, 500, low) == 11
    off = [policy.num_drafts(64, 500, low) for _ in range(50)]
    assert [i for i, length in enumerate(off) if length] == [11, 12, 36, 37]
    assert off[11] == LOOKUP.k
    on = [policy.num_drafts(1, 500, high) for _ in range(11)]
    assert [i for i, length in enumerate(on) if not length] == [8, 9]


def test_disable_by_batch_size_is_a_ceiling_on_any_device():
    policy = SpeculationPolicy(LOOKUP, disable_by_batch_size=8)
    assert policy.num_drafts(8, 100, SpecStats()) == 4  # no cost measured yet: full length
    assert policy.num_drafts(9, 100, SpecStats()) == 0


def test_a_device_without_a_model_has_its_step_time_measured():
    measured = MeasuredCost()
    for _ in range(3):
        measured.observe(1, 0.015)
    assert measured(1, 4, 0) is None  # every step the same size: no line yet
    for tokens in (1, 5, 3, 9, 1, 2):
        measured.observe(tokens, 0.010 + 0.005 * tokens)
    fixed, per_token = measured.line()
    assert per_token == pytest.approx(0.005, rel=0.2) and fixed == pytest.approx(0.010, rel=0.3)
    spec = SpecStats(measured=measured, recent_acceptance=0.6)
    # 15 ms plain; one draft kept 60% of the time: 1.6 tokens in 20 ms; two: 1.96 in 25.
    assert SpeculationPolicy(LOOKUP).num_drafts(1, 100, spec) == 1


def test_the_recent_acceptance_is_the_chance_a_draft_is_kept_after_kept_ones():
    spec = SpecStats()
    for _ in range(60):
        spec.record(drafted=4, accepted=1)  # kept one, refused the second: 1 of 2 judged
        spec.step_done(5, 0.01, decode_only=True)
    assert spec.recent_acceptance == pytest.approx(0.5, abs=0.01)
    assert spec.as_dict()["acceptance_rate"] == 0.25
    assert spec.as_dict()["mean_accepted_length"] == 2.0


@pytest.mark.parametrize("swapped", [False, True], ids=["on the GPU", "swapped out"])
def test_trimming_gives_back_the_slots_and_blocks_only_drafts_used(swapped):
    manager = BlockManager(16, 4, num_cpu_blocks=16)
    manager.allocate(0, 10)  # 3 blocks, the last holding 2 slots
    manager.append_slots(0, 5)  # the newest token and 4 drafts: slots 10..14, 4 blocks
    assert manager.num_free_blocks == 12
    if swapped:
        manager.swap_out([0])
    manager.trim_slots(0, 12)  # 1 draft kept (slot 11); slots 12..14 given back
    assert manager.num_slots(0) == 12
    if swapped:
        assert manager.blocks_to_swap_in([0]) == 3
        manager.swap_in([0])
    assert manager.num_free_blocks == 13
    assert len(manager.block_table(0)) == 3
    manager.append_slots(0, 1)  # the next token takes a fresh block again
    assert len(manager.block_table(0)) == 4
    manager.free(0)
    assert manager.num_free_blocks == 16


def test_a_trim_below_the_released_window_is_refused():
    manager = BlockManager(16, 4)
    manager.allocate(0, 6)
    with pytest.raises(ValueError, match="cannot trim to 7"):
        manager.trim_slots(0, 7)


def test_measured_steps_overrule_a_model_that_leaves_the_host_out():
    """The roofline says drafts pay at this batch; the measured steps, host work
    included, say plain ones gave more tokens a second: the step decodes plainly."""
    policy = SpeculationPolicy(LOOKUP, cost=linear_cost(10e-3, 20e-6))
    spec = stats(0.6)
    assert policy.num_drafts(200, 500, spec) == 2
    for _ in range(4):
        spec.rates.observe(200, speculated=True, tokens=560, seconds=0.05)  # 11,200 a second
        spec.rates.observe(200, speculated=False, tokens=200, seconds=0.015)  # 13,333
    assert policy.num_drafts(200, 500, spec) == 0
    assert policy.num_drafts(60, 500, spec) > 0  # another batch size: not measured yet


def test_measured_steps_also_overrule_a_model_that_says_plain():
    """Where the measured speculating steps gave more tokens a second than plain ones, the
    step speculates though the model said plain, as far as the model finds best."""
    policy = SpeculationPolicy(LOOKUP, cost=linear_cost(10e-3, 20e-6))
    spec = stats(0.2)
    assert policy.num_drafts(2048, 500, spec) == 0
    for _ in range(4):
        spec.rates.observe(2048, speculated=True, tokens=3000, seconds=0.1)
        spec.rates.observe(2048, speculated=False, tokens=2048, seconds=0.1)
    assert policy.num_drafts(2048, 500, spec) == 1


def test_probes_of_the_slower_way_cost_a_small_share_of_the_time():
    """Speculating steps measured at a third of the plain rate: 4 probe steps cost 4 x
    2/3 of a step, so the policy waits 134 steps between probes (2% of the time)."""
    policy = SpeculationPolicy(LOOKUP, cost=linear_cost(10e-3, 20e-6))
    spec = stats(0.6)
    for _ in range(4):
        spec.rates.observe(256, speculated=True, tokens=300, seconds=0.03)
        spec.rates.observe(256, speculated=False, tokens=256, seconds=0.00853)
    assert spec.rates.affordable_wait(256, 4, 0.02) == 134
    ways = [policy.num_drafts(256, 500, spec) for _ in range(300)]
    assert ways.index(4) == 134 and ways.count(4) == 4
    # Switching into speculating took half a second (a draft model caught up): a probe
    # costs that too, and they come 20 times further apart.
    spec.rates.observe_switch(256, 0.5)
    assert spec.rates.affordable_wait(256, 4, 0.02) == 2915


def test_a_speculating_steps_host_work_lengthens_its_drafts():
    """A speculating step also pays the host's work between steps (it does not overlap
    the device's): longer drafts spread it over more tokens, and where drafts are
    kept less often it outweighs them."""
    policy = SpeculationPolicy(PromptLookup(k=8, min_n=1, max_n=3),
                               cost=linear_cost(10e-3, 20e-6))
    often, less = stats(0.9), stats(0.8)
    assert policy.best_length(256, 500, often) == 5
    assert policy.best_length(256, 500, less) == 3
    for spec in (often, less):
        spec.observe_sync_host(256, 0.02)
    assert policy.best_length(256, 500, often) == 8
    assert policy.best_length(256, 500, less) == 0


def test_the_host_work_of_plain_steps_prices_speculating_before_it_is_measured():
    """Before any speculating step at a batch size is measured, one is taken to wait for
    the host's work the steps so far measured (per sequence): at 256 sequences and
    100 us each, 25.6 ms on top of the device's time outweigh drafts kept 80% of the
    time."""
    policy = SpeculationPolicy(PromptLookup(k=8, min_n=1, max_n=3),
                               cost=linear_cost(10e-3, 20e-6))
    spec = stats(0.8)
    assert policy.best_length(256, 500, spec) == 3
    spec.observe_host(256, 256 * 100e-6)
    assert spec.host_per_seq == pytest.approx(100e-6)
    assert policy.best_length(256, 500, spec) == 0
    assert policy.best_length(8, 500, spec) == 8  # 0.8 ms: drafts still pay at 8
    # Once speculating steps at 256 are measured, their own host work counts.
    spec.observe_sync_host(256, 1e-3)
    assert policy.best_length(256, 500, spec) == 3


def test_coverage_counts_only_sequences_whose_newest_token_is_known():
    """A sequence planned while the step before it ran has no newest token to look up
    from: it does not lower the measured share of sequences with drafts."""
    spec = stats(0.6, coverage=0.5)
    spec.scheduled(decodes=10, known=4, drafting=4, speculating=True)
    assert spec.recent_coverage > 0.5


def test_no_probe_into_speculating_where_the_model_and_the_measured_steps_agree():
    """Drafts are never kept and the measured speculating steps were slower: probing
    would only cost (a draft model would catch up with every sequence for nothing)."""
    policy = SpeculationPolicy(LOOKUP, cost=linear_cost(10e-3, 20e-6), probe_every=8,
                               probe_len=2)
    spec = stats(0.0)
    for _ in range(4):
        spec.rates.observe(64, speculated=True, tokens=64, seconds=0.02)
        spec.rates.observe(64, speculated=False, tokens=64, seconds=0.01)
    assert not any(policy.num_drafts(64, 500, spec) for _ in range(500))


def test_one_probe_measures_the_way_it_goes():
    """Of a probe's steps, the first finds no newest token to draft from (with
    asynchronous scheduling, it is planned while a plain step runs) and the second is
    timed apart (the switch); the rest are enough to compare the two ways, so the policy
    knows after one probe which is faster."""
    policy = SpeculationPolicy(LOOKUP, cost=linear_cost(10e-3, 20e-6))
    spec = stats(0.6)
    for _ in range(20):
        spec.rates.observe(256, speculated=False, tokens=256, seconds=0.01)
    spec.rates.observe_switch(256, 0.05)  # the probe's second step
    for _ in range(policy.probe_len - 2):
        spec.rates.observe(256, speculated=True, tokens=300, seconds=0.03)
    assert spec.rates.speculating_is_faster(256) is False


def test_the_policy_weighs_the_batch_the_waiting_prompts_fill():
    """Two prompts start a step (the token budget); each step's drafts are weighed at the
    batch the running and waiting ones make together, up to max_num_seqs, not at the
    few running yet: a ramp to a large batch is judged at the size it runs at."""
    weighed: list[int] = []

    class Watched(SpeculationPolicy):
        def num_drafts(self, decodes: int, context: int, stats: SpecStats) -> int:
            weighed.append(decodes)
            return 0

    scheduler = Scheduler(SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=32,
                                          max_model_len=64, speculation=Watched(LOOKUP)),
                          BlockManager(64, 4))
    for i in range(8):
        scheduler.add(SequenceGroup(str(i), [Sequence(i, list(range(10, 26)))],
                                    SamplingParams(max_tokens=4, ignore_eos=True)))
    running = []
    for _ in range(3):
        running.append(len(scheduler.running))
        step = scheduler.schedule()
        scheduler.update(step, StepOutput([Sample(seq.seq_id, 7, -0.5) for seq in step.seqs
                                           if seq.do_sample]))
    assert running == [0, 2, 4] and weighed == [6, 6, 6]
