"""The sampler's repetition, presence and frequency penalties on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch
from support.sampler_cases import apply_penalties
from support.sampler_cases import gen as _gen
from support.sampler_cases import seq as _seq

from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.sampler import sample

BASE = [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]


def _penalize(params: SamplingParams, prompt: list[int], output: list[int]) -> list[float]:
    logits = torch.tensor([BASE])
    return apply_penalties(logits, [_seq(params, prompt=prompt, output=output)])[0].tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    got = _penalize(SamplingParams(repetition_penalty=2.0), prompt=[0, 1], output=[3, 3])
    # Seen (prompt and output, each once): 0, 1, 3.
    assert got == pytest.approx([1.0, -2.0, 0.5, 1.5, -2.0, 1.0])


def test_repetition_penalty_below_one_encourages():
    got = _penalize(SamplingParams(repetition_penalty=0.5), prompt=[4], output=[0])
    assert got == pytest.approx([4.0, -1.0, 0.5, 3.0, -1.0, 1.0])


def test_presence_penalty_counts_output_once_and_ignores_prompt():
    got = _penalize(SamplingParams(presence_penalty=0.5), prompt=[0, 2], output=[3, 3, 1])
    assert got == pytest.approx([2.0, -1.5, 0.5, 2.5, -2.0, 1.0])


def test_frequency_penalty_counts_occurrences_in_output():
    got = _penalize(SamplingParams(frequency_penalty=0.25), prompt=[0, 2], output=[3, 3, 1])
    assert got == pytest.approx([2.0, -1.25, 0.5, 2.5, -2.0, 1.0])


def test_negative_presence_and_frequency_encourage():
    got = _penalize(SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5),
                    prompt=[], output=[5, 5, 5])
    assert got == pytest.approx([2.0, -1.0, 0.5, 3.0, -2.0, 1.0 + 1.0 + 1.5])


def test_all_penalties_together():
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    got = _penalize(params, prompt=[0, 1], output=[3, 3, 1])
    # repetition on {0, 1, 3}: [1, -2, .5, 1.5, -2, 1]; then token 3 (x2): -0.5 - 0.5,
    # token 1 (x1): -0.25 - 0.5.
    assert got == pytest.approx([1.0, -2.75, 0.5, 0.5, -2.0, 1.0])


def test_penalties_with_empty_output():
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=1.0)
    got = _penalize(params, prompt=[3], output=[])
    assert got == pytest.approx([2.0, -1.0, 0.5, 1.5, -2.0, 1.0])


def test_penalties_touch_only_rows_that_ask():
    logits = torch.tensor([BASE, BASE])
    seqs = [_seq(SamplingParams(), 0), _seq(SamplingParams(presence_penalty=1.0), 1, output=[0])]
    # The unpenalized row carries no history at all.
    assert seqs[0].output_token_ids is None
    out = apply_penalties(logits, seqs)
    assert out[0].tolist() == BASE
    assert out[1].tolist() == pytest.approx([1.0] + BASE[1:])


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([BASE])
    plain = sample(logits, [_seq(SamplingParams(temperature=0.0))], _gen())[0]
    assert plain.token_id == 3
    params = SamplingParams(temperature=0.0, frequency_penalty=1.0, logprobs=0)
    penalized = sample(logits, [_seq(params, output=[3, 3])], _gen())[0]
    # 3.0 - 2 * 1.0 = 1.0 < 2.0: token 0 wins.
    assert penalized.token_id == 0
    assert penalized.logprob == pytest.approx(math.log(torch.softmax(logits, -1)[0, 0].item()))

