"""Async scheduling: a parallel-sampling request preempted while the step that
computes its prompt is in flight; that step's samples then fork its sequence."""
import pytest

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.block_manager import BlockManager
from pagedserve.scheduler.scheduler import Scheduler, SchedulerConfig
from pagedserve.scheduler.sequence import SequenceGroup
from pagedserve.scheduler.step import Sample, StepInput, StepOutput


def _samples(step: StepInput) -> StepOutput:
    return StepOutput([Sample(s.seq_id, 9, -0.1) for s in step.seqs for _ in range(s.num_samples)])


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_n2_preempted_while_prompt_in_flight(mode: str) -> None:
    manager = BlockManager(4, 4, num_cpu_blocks=8)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64,
                                          max_model_len=16, preemption_mode=mode), manager)
    a = SequenceGroup("a", [scheduler.new_sequence([5] * 8)],
                      SamplingParams(max_tokens=4, ignore_eos=True))
    b = SequenceGroup("b", [scheduler.new_sequence([6] * 8)],
                      SamplingParams(n=2, max_tokens=4, ignore_eos=True))
    scheduler.add(a)
    scheduler.add(b)
    in_flight = scheduler.schedule()   # both prompts fill the pool
    planned = scheduler.schedule()     # a's decode needs a block: b is preempted
    assert scheduler.num_preemptions == 1
    scheduler.update(in_flight, _samples(in_flight))   # b forks a preempted sequence
    scheduler.free_finished([a, b])
    for _ in range(50):
        if a.finished and b.finished:
            break
        in_flight, planned = planned, scheduler.schedule()
        scheduler.free_finished(scheduler.update(in_flight, _samples(in_flight)))
    else:
        pytest.fail("a request never finished")
    assert [len(seq.output_token_ids) for seq in b.seqs] == [4, 4]
    assert manager.num_free_blocks == 4
