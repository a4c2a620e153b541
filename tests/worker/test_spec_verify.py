"""Verifying speculated tokens (worker/spec_verify.py).

Greedy verification keeps the target's greedy output token for token. Rejection
sampling keeps the target's distribution exactly: a toy target over 3 tokens,
whose distribution depends on the whole prefix, generates 3-token sequences by
speculation (k = 2) with a draft model that has its own distributions, and with a
proposer that proposes with certainty; the sequences' frequencies are held to the
target's exact joint probabilities by a chi-square test with 26 degrees of freedom
at a false-failure rate of about 1e-6 (Wilson-Hilferty's critical value, 76.2).
A verifier that keeps every draft token fails the same test.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from pagedserve.worker.spec_verify import verify_greedy, verify_sampled

VOCAB, LENGTH, K, TRIALS = 3, 3, 2, 12_000
CRITICAL = 76.2  # chi-square, 26 degrees of freedom, upper tail about 1e-6


def test_greedy_keeps_drafts_while_they_are_the_argmax_then_the_targets_token():
    assert verify_greedy([4, 5, 6], [4, 5]) == [4, 5, 6]  # all kept, and the bonus
    assert verify_greedy([4, 7, 6], [4, 5]) == [4, 7]  # the second refused: the target's
    assert verify_greedy([9, 5, 6], [4, 5]) == [9]
    assert verify_greedy([3], []) == [3]


def _distribution(prefix: tuple[int, ...], salt: int) -> torch.Tensor:
    """A fixed distribution for each prefix, every token at least 0.1 likely."""
    rng = random.Random(hash((prefix, salt)))
    weights = torch.tensor([0.1 + rng.random() for _ in range(VOCAB)], dtype=torch.float64)
    return weights / weights.sum()


def _target(prefix: tuple[int, ...]) -> torch.Tensor:
    return _distribution(prefix, 1)


def _generate(generator: torch.Generator, rng: random.Random, mode: str) -> tuple[int, ...]:
    out: tuple[int, ...] = ()
    while len(out) < LENGTH:
        draft, draft_rows = [], []
        for _ in range(K):
            q = _distribution(out + tuple(draft), 2)
            if mode == "certain":  # the draft's likeliest token, proposed with certainty
                draft.append(int(q.argmax()))
            else:
                draft.append(rng.choices(range(VOCAB), weights=q.tolist())[0])
                draft_rows.append(q)
        probs = torch.stack([_target(out + tuple(draft[:i])) for i in range(K + 1)])
        if mode == "keep all":  # wrong on purpose: every draft kept
            tokens = [*draft, int(torch.multinomial(probs[K], 1, generator=generator))]
        else:
            tokens = verify_sampled(probs, draft, generator,
                                    torch.stack(draft_rows) if draft_rows else None)
        out += tuple(tokens)
    return out[:LENGTH]


def _chi_square(mode: str) -> float:
    generator, rng = torch.Generator().manual_seed(0), random.Random(0)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(TRIALS):
        sequence = _generate(generator, rng, mode)
        counts[sequence] = counts.get(sequence, 0) + 1
    statistic = 0.0
    for sequence in itertools.product(range(VOCAB), repeat=LENGTH):
        exact = math.prod(float(_target(sequence[:i])[token])
                          for i, token in enumerate(sequence))
        expected = TRIALS * exact
        statistic += (counts.get(sequence, 0) - expected) ** 2 / expected
    return statistic


@pytest.mark.parametrize("mode", ["draft model", "certain"])
def test_rejection_sampling_keeps_the_targets_distribution(mode):
    assert _chi_square(mode) < CRITICAL


def test_the_test_catches_a_verifier_that_keeps_every_draft():
    assert _chi_square("keep all") > CRITICAL


def test_a_draft_the_target_cannot_produce_is_always_refused():
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        assert verify_sampled(probs, [0], generator) == [1]


def test_the_rows_must_be_one_more_than_the_draft():
    with pytest.raises(ValueError, match="needs one more"):
        verify_sampled(torch.ones(2, 3) / 3, [0, 1], torch.Generator())
