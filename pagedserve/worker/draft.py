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

Under tensor parallelism the draft is split like the target (its heads, MLP
features and vocabulary rows by rank, its KV in every rank's blocks), and
every rank runs its passes. Rank 0 samples: it broadcasts what the target's
step kept and sampled, and each pass's proposals, so the ranks feed the same
tokens (`sampled_outcomes`, `Drafter._greedy`).
"""

from __future__ import annotations

import dataclasses

import torch

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.step import Sample, ScheduledSequence, StepInput, StepOutput
from pagedserve.worker.distributed import TPGroup
from pagedserve.worker.layers.attention import KVCache
from pagedserve.worker.model_runner import ModelRunner

_GREEDY = SamplingParams(temperature=0.0)


class Drafter:
    def __init__(self, runner: ModelRunner, tp: TPGroup = TPGroup()) -> None:
        self.runner = runner  # the draft model's, without adapters or CUDA graphs
        self.tp = tp

    @torch.inference_mode()
    def propose(self, step: StepInput, output: StepOutput | None, kv_caches: list[KVCache]
                ) -> StepOutput | None:
        """Compute the step's verified tokens in the draft's cache, and add each asking
        sequence's proposals to its sample (on rank 0, whose `output` has the samples).
        `step` has its tokens in flight filled in."""
        if not any(seq.num_proposals for seq in step.seqs):
            return output
        sampled = sampled_outcomes(step.seqs, output, self.tp, self.runner.device)
        first, asking = [], {}
        for seq in step.seqs:
            outcome = sampled.get(seq.seq_id)
            if not seq.num_proposals or outcome is None:
                continue
            kept, token = outcome
            drafts = seq.draft_token_ids or []
            context = seq.draft_context or []
            tokens = context + seq.token_ids[:len(seq.token_ids) - len(drafts)]
            tokens += drafts[:kept] + [token]
            asking[seq.seq_id] = seq
            first.append(ScheduledSequence(seq_id=seq.seq_id, token_ids=tokens,
                                           start_pos=seq.start_pos - len(context),
                                           block_table=seq.block_table, do_sample=True,
                                           sampling_params=_GREEDY))
        if not first:
            return output
        proposals: dict[int, list[int]] = {seq_id: [] for seq_id in asking}
        ends = {seq.seq_id: seq.start_pos + len(seq.token_ids) for seq in first}
        going = first
        while going:
            for seq, token in zip(going, self._greedy(going, kv_caches), strict=True):
                proposals[seq.seq_id].append(token)
            going = []
            for seq_id, tokens in proposals.items():
                if len(tokens) < asking[seq_id].num_proposals:
                    going.append(ScheduledSequence(
                        seq_id=seq_id, token_ids=[tokens[-1]], start_pos=ends[seq_id],
                        block_table=asking[seq_id].block_table, do_sample=True,
                        sampling_params=_GREEDY))
                    ends[seq_id] += 1
        if output is None:
            return None
        return dataclasses.replace(output, samples=[
            with_proposals(sample, proposals.get(sample.seq_id))
            for sample in output.samples])

    def _greedy(self, seqs: list[ScheduledSequence], kv_caches: list[KVCache]) -> list[int]:
        """One pass of the draft over `seqs`: each one's proposal, on every rank."""
        drafted = self.runner.execute(StepInput(seqs=seqs), kv_caches)
        tokens = None
        if drafted is not None:
            by_id = {sample.seq_id: sample.token_id for sample in drafted.samples}
            tokens = [by_id[seq.seq_id] for seq in seqs]
        return broadcast_tokens(tokens, len(seqs), self.tp, self.runner.device)


def sampled_outcomes(seqs: list[ScheduledSequence], output: StepOutput | None, tp: TPGroup,
                     device: torch.device) -> dict[int, tuple[int, int]]:
    """Each sampling sequence's (drafts kept, token sampled) in the target's step, on every
    rank: rank 0 sampled them and broadcasts them to the others."""
    ids = [seq.seq_id for seq in seqs if seq.do_sample]
    outcomes: dict[int, tuple[int, int]] = {}
    for sample in output.samples if output is not None else ():
        outcomes.setdefault(sample.seq_id, (len(sample.accepted or ()), sample.token_id))
    if tp.size == 1 or not ids:
        return outcomes
    values = (torch.tensor([outcomes[seq_id] for seq_id in ids], dtype=torch.int64)
              if output is not None else torch.empty(len(ids), 2, dtype=torch.int64))
    values = tp.broadcast(values.to(device)).tolist()
    return {seq_id: (kept, token) for seq_id, (kept, token) in zip(ids, values, strict=True)}


def broadcast_tokens(tokens: list[int] | None, count: int, tp: TPGroup,
                     device: torch.device) -> list[int]:
    """Rank 0's `count` proposed tokens on every rank (`tokens` None on the others)."""
    if tp.size == 1:
        assert tokens is not None
        return tokens
    values = (torch.tensor(tokens, dtype=torch.int64) if tokens is not None
              else torch.empty(count, dtype=torch.int64))
    return tp.broadcast(values.to(device)).tolist()


def with_proposals(sample: Sample, proposals: list[int] | None) -> Sample:
    return sample if not proposals else dataclasses.replace(sample, proposals=proposals)
