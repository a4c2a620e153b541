"""A draft model beside the target on one worker (speculative decoding's
`draft_model` method).

The draft has the target's vocabulary and its own KV pool: the same blocks,
block tables and slots as the target's, in tensors of its own shape, so one
block manager (and one pool accounting: a block's bytes are both models')
serves both.

After the target's step is verified, for each sequence that asks
(`ScheduledSequence.num_proposals` = j):

    step:      x_p  d1  d2  d3         target: keeps d1, refuses d2, samples s
    draft  1:  ... x_p  d1  s          one pass over the kept tokens and s -> e1
    draft  2:  e1                      a decode pass -> e2, ... up to e_j
    proposals: e1 .. e_j               verified in the sequence's next step

The first pass starts where the draft's cache of the sequence ends
(`draft_context`, "..."): the draft computes only in steps that speculate, so
steps the policy decodes plainly, and the prompt, cost it nothing until the
sequence speculates again; it then catches up in one pass. The decode passes
write e1 .. e_{j-1}, past the step's tokens, into the lookahead slots the
scheduler reserved (scheduler/proposers.py) and takes back after the step.
The scheduler counts what the draft has (`Sequence.draft_computed`): the
verified tokens, not s, whose slot may go back with the lookahead's.
Proposals are the draft's argmax: a proposer that proposes with certainty,
which rejection sampling keeps exact for sampled requests too
(spec_verify.py).
"""

from __future__ import annotations

import dataclasses

import torch

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.step import Sample, ScheduledSequence, StepInput, StepOutput
from pagedserve.worker.layers.attention import KVCache
from pagedserve.worker.model_runner import ModelRunner

_GREEDY = SamplingParams(temperature=0.0)


class Drafter:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner  # the draft model's, without adapters or CUDA graphs

    @torch.inference_mode()
    def propose(self, step: StepInput, output: StepOutput | None, kv_caches: list[KVCache]
                ) -> StepOutput | None:
        """Compute the step's verified tokens in the draft's cache, and add each asking
        sequence's proposals to its sample. `step` has its tokens in flight filled in."""
        if output is None:
            return None
        samples = {sample.seq_id: sample for sample in output.samples}
        first, asking = [], {}
        for seq in step.seqs:
            sample = samples.get(seq.seq_id)
            if not seq.num_proposals or sample is None:
                continue
            context = seq.draft_context or []
            tokens = context + seq.token_ids[:len(seq.token_ids)
                                             - len(seq.draft_token_ids or ())]
            tokens += [token for token, _ in sample.accepted or ()]
            tokens.append(sample.token_id)
            asking[seq.seq_id] = seq
            first.append(ScheduledSequence(seq_id=seq.seq_id, token_ids=tokens,
                                           start_pos=seq.start_pos - len(context),
                                           block_table=seq.block_table, do_sample=True,
                                           sampling_params=_GREEDY))
        if not first:
            return output
        proposals: dict[int, list[int]] = {seq_id: [] for seq_id in asking}
        drafted = self.runner.execute(StepInput(seqs=first), kv_caches)
        ends = {seq.seq_id: seq.start_pos + len(seq.token_ids) for seq in first}
        while drafted is not None and drafted.samples:
            for sample in drafted.samples:
                proposals[sample.seq_id].append(sample.token_id)
            going = [seq_id for seq_id, tokens in proposals.items()
                     if len(tokens) < asking[seq_id].num_proposals]
            if not going:
                break
            decodes = []
            for seq_id in going:
                position = ends[seq_id]
                ends[seq_id] += 1
                decodes.append(ScheduledSequence(
                    seq_id=seq_id, token_ids=[proposals[seq_id][-1]], start_pos=position,
                    block_table=asking[seq_id].block_table, do_sample=True,
                    sampling_params=_GREEDY))
            drafted = self.runner.execute(StepInput(seqs=decodes), kv_caches)
        return dataclasses.replace(output, samples=[
            with_proposals(sample, proposals.get(sample.seq_id))
            for sample in output.samples])


def with_proposals(sample: Sample, proposals: list[int] | None) -> Sample:
    return sample if not proposals else dataclasses.replace(sample, proposals=proposals)
