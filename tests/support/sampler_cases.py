"""Scheduled sequences and generators for the sampler's tests."""

from __future__ import annotations

import torch

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.step import ScheduledSequence
from pagedserve.worker import sampler
from pagedserve.worker.sampler import SamplingBatch


def seq(params: SamplingParams, seq_id: int = 0, *, output_index: int = 0,
        prompt: list[int] | None = None, output: list[int] | None = None) -> ScheduledSequence:
    if params.uses_penalties:
        prompt = prompt if prompt is not None else []
        output = output if output is not None else []
    return ScheduledSequence(seq_id=seq_id, token_ids=[1], start_pos=0, block_table=[0],
                             do_sample=True, sampling_params=params, output_index=output_index,
                             prompt_token_ids=prompt, output_token_ids=output)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def apply_penalties(logits: torch.Tensor, seqs: list[ScheduledSequence]) -> torch.Tensor:
    batch = SamplingBatch.build(seqs, logits.shape[1], logits.device)
    return sampler.apply_penalties(logits, batch.penalties)
