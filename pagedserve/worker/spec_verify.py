"""Verifying speculated tokens: the target model's k + 1 rows against k draft tokens.

    draft:   d0   d1   d2           the proposer's guesses
    target:  p0   p1   p2   p3      the target's distributions after the context, d0, d0 d1, ...
    output:  d0   d1   r2           d2 rejected: r2 is drawn again; or d0 d1 d2 b3 (b3: bonus)

Greedy: a draft token is kept while it is the target's own argmax; the first
that is not is replaced by the argmax, and when all k are kept the target's
next token follows (the bonus), so the output is token for token the target's
greedy output. Sampled: standard rejection sampling (Leviathan et al. 2023;
Chen et al. 2023): d_i is kept with probability min(1, p_i(d_i) / q_i(d_i)),
and the first refused is replaced by a draw from the normalised
max(0, p_i - q_i); when all are kept, the bonus is drawn from p_k. The tokens
that come out are distributed exactly as the target's own samples. A proposer
without probabilities (prompt lookup) proposes with certainty: q_i is one-hot
at d_i, so d_i is kept with probability p_i(d_i), and a refused one is drawn
again from p_i without d_i.

`p_i` are the target's processed distributions (temperature, top-k, top-p,
min-p, masks applied), as its sampler would draw from them.
"""

from __future__ import annotations

import dataclasses

import torch

from pagedserve.scheduler.step import Sample, ScheduledSequence
from pagedserve.worker import sampler
from pagedserve.worker.token_masks import apply_token_bitmask_


def verify_greedy(target_tokens: list[int], draft: list[int]) -> list[int]:
    """The output tokens, given the target's argmax at each of the k + 1 rows."""
    out = []
    for target, guess in zip(target_tokens, draft, strict=False):
        out.append(target)
        if target != guess:
            return out
    out.append(target_tokens[len(draft)])
    return out


def verify_sampled(probs: torch.Tensor, draft: list[int], generator: torch.Generator,
                   draft_probs: torch.Tensor | None = None) -> list[int]:
    """The output tokens, by rejection sampling.

    probs: [k + 1, V] the target's distributions; draft_probs: [k, V] the proposer's
    (None: it proposed with certainty).
    """
    if probs.shape[0] != len(draft) + 1:
        raise ValueError(f"probs has {probs.shape[0]} rows for {len(draft)} draft tokens; "
                         "it needs one more")
    out = []
    for i, guess in enumerate(draft):
        p = probs[i]
        q = _one_hot(guess, p) if draft_probs is None else draft_probs[i]
        keep = torch.clamp(p[guess] / q[guess], max=1.0) if q[guess] > 0 else p.new_zeros(())
        if torch.rand((), generator=generator, device=p.device) < keep:
            out.append(guess)
            continue
        residual = torch.clamp(p - q, min=0.0)
        if residual.sum() <= 0:  # p equals q where q has mass: nothing is left over
            residual = p
        out.append(_draw(residual, generator))
        return out
    out.append(_draw(probs[len(draft)], generator))
    return out


def _one_hot(token: int, like: torch.Tensor) -> torch.Tensor:
    q = torch.zeros_like(like)
    q[token] = 1.0
    return q


def _draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(weights / weights.sum(), 1, generator=generator))


def sample_and_verify(logits: torch.Tensor, seqs: list[ScheduledSequence],
                      generator: torch.Generator, token_bitmask: torch.Tensor | None = None
                      ) -> list[Sample]:
    """A step's samples where some sequences speculated: logits hold one row per plain
    sequence and 1 + k rows per speculating one, in `seqs` order. Plain rows go
    through the sampler; each speculating sequence's rows verify its k drafts."""
    counts = [1 + len(seq.draft_token_ids or ()) for seq in seqs]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    plain = [i for i, seq in enumerate(seqs) if not seq.draft_token_ids]
    samples: list[Sample] = []
    if plain:
        rows = torch.tensor([starts[i] for i in plain], device=logits.device)
        samples += sampler.sample(logits[rows], [seqs[i] for i in plain], generator,
                                  token_bitmask)
    for seq, start, count in zip(seqs, starts, counts, strict=True):
        if seq.draft_token_ids:
            samples.append(_verified(logits[start:start + count].float(), seq, generator,
                                     token_bitmask))
    return samples


def _verified(rows: torch.Tensor, seq: ScheduledSequence, generator: torch.Generator,
              token_bitmask: torch.Tensor | None = None) -> Sample:
    """A structured output's rows are masked first, each by its own bitmask row (the
    grammar's state after the drafts before it), as its plain steps would be."""
    draft = seq.draft_token_ids
    assert draft is not None and seq.sampling_params is not None
    logprobs = rows.log_softmax(dim=-1)  # raw: what a plain step reports
    if seq.bitmask_row is not None:
        assert token_bitmask is not None
        rows = apply_token_bitmask_(
            rows.clone(), token_bitmask[seq.bitmask_row:seq.bitmask_row + len(rows)])
        seq = dataclasses.replace(seq, bitmask_row=None)  # applied
    if seq.sampling_params.greedy:
        tokens = verify_greedy(rows.argmax(dim=-1).tolist(), draft)
    else:
        tokens = verify_sampled(sampler.distributions(rows, [seq] * len(rows)), draft,
                                generator)
    values = [float(logprobs[i, token]) for i, token in enumerate(tokens)]
    return Sample(seq.seq_id, tokens[-1], values[-1],
                  accepted=list(zip(tokens[:-1], values[:-1], strict=True)))
