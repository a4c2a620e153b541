"""Prompt logprobs: the log-probability of each prompt token given the ones before it.

The row of a step at prompt position p predicts the prompt token at p + 1:

    positions   0    1    2    3        a 4-token prompt, one chunk
    tokens      t0   t1   t2   t3
    scored      t1   t2   t3   -        (the last row samples the first output)

Scored rows go through the LM head in chunks, since [rows, vocab] float32
logits for a whole long prompt would take gigabytes; each chunk comes back to
the host in one copy. Values are log-softmax of the raw logits, as for
sampled tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedserve.scheduler.step import PromptLogprobs, ScheduledSequence

CHUNK_ROWS = 256


def score(model: nn.Module, hidden: torch.Tensor, seqs: list[ScheduledSequence],
          row_starts: list[int]) -> list[PromptLogprobs]:
    """hidden: [T, hidden_size], the step's rows; seqs[i]'s rows start at row_starts[i].

    Every tensor-parallel rank calls this (the LM head gathers over ranks); rank
    0 returns the scores, the others an empty list.
    """
    owners = [(seq, start) for seq, start in zip(seqs, row_starts, strict=True)
              if seq.prompt_targets]
    rows = [start + i for seq, start in owners for i in range(len(seq.prompt_targets))]
    targets = [t for seq, _ in owners for t in seq.prompt_targets]
    num_top = max(seq.prompt_logprobs for seq, _ in owners)
    values: list[list[float]] = []
    for begin in range(0, len(rows), CHUNK_ROWS):
        index = torch.tensor(rows[begin:begin + CHUNK_ROWS], device=hidden.device)
        logits = model.compute_logits(hidden[index])  # [R, vocab] float32, rank 0 only
        if logits is None:
            continue
        log_probs = logits.log_softmax(dim=-1)
        chunk_targets = torch.tensor(targets[begin:begin + CHUNK_ROWS], device=hidden.device)
        parts = [log_probs.gather(1, chunk_targets[:, None]).double()]  # [R, 1]
        if num_top:
            top_values, top_ids = log_probs.topk(num_top, dim=-1)
            parts += [top_ids.double(), top_values.double()]
        values.extend(torch.cat(parts, dim=1).tolist())
    if not values:
        return []
    scored, row = [], 0
    for seq, _ in owners:
        entries = []
        for target in seq.prompt_targets:
            entries.append(_entry(target, values[row], num_top, seq.prompt_logprobs))
            row += 1
        scored.append(PromptLogprobs(seq.seq_id, seq.start_pos + 1, entries))
    return scored


def _entry(target: int, row: list[float], num_top: int, k: int) -> dict[int, float]:
    """{target: logprob, then the k most likely}; float64 holds every id exactly."""
    entry = {target: row[0]}
    top_ids, top_values = row[1:1 + num_top], row[1 + num_top:]
    entry.update((int(tid), value) for tid, value in zip(top_ids[:k], top_values[:k], strict=True)
                 if int(tid) not in entry)
    return entry
