"""A scheduler, its block manager and a fake executor, for the scheduler tests."""

from __future__ import annotations

import itertools

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.block_manager import BlockManager
from pagedserve.scheduler.scheduler import Scheduler, SchedulerConfig
from pagedserve.scheduler.sequence import Sequence, SequenceGroup
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


def scheduled_ids(step_input: StepInput) -> list[int]:
    return [s.seq_id for s in step_input.seqs]


def seq_of(group: SequenceGroup, i: int = 0) -> Sequence:
    return group.seqs[i]
