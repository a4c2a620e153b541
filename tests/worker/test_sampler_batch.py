"""The sampler as one batch: seeded noise from a counter-based hash, one copy back per step."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_sampler import _gen, _logits, _seq

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.step import ScheduledSequence
from pagedserve.worker import sampler
from pagedserve.worker.sampler import sample


def _splitmix64_reference(x: int) -> int:
    mask = 2**64 - 1
    x &= mask
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & mask
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def test_seeded_noise_is_splitmix64_of_stream_and_column():
    """The seeded noise is a fixed function of (stream, vocabulary id): the same on
    every device and in every batch, as the integer reference computes it."""
    streams = [0, 1, 2**62 + 12345, sampler._stream(7, 3, 1)]
    noise = sampler._hashed_exponential(torch.tensor(streams), 17)
    for row, stream in enumerate(streams):
        for column in range(17):
            bits = _splitmix64_reference(stream + (column + 1) * 0x9E3779B97F4A7C15)
            expected = -math.log(((bits >> 11) + 0.5) * 2.0**-53)
            assert noise[row, column].item() == pytest.approx(expected, rel=1e-6)


def test_seeded_noise_is_exponential():
    noise = sampler._hashed_exponential(torch.arange(64) * 1000003, 4096).double()
    assert noise.min() > 0
    assert noise.mean().item() == pytest.approx(1.0, abs=0.01)
    assert noise.var().item() == pytest.approx(1.0, abs=0.03)


def test_a_mixed_batch_copies_to_the_host_once(monkeypatch):
    """Greedy, random, seeded, penalized, n>1, logprobs and beam rows in one step:
    the sampled ids come back in one copy, and nothing else reads the device."""
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9, top_p=0.8, logprobs=3),
        SamplingParams(temperature=0.7, top_k=5, seed=11, repetition_penalty=1.3),
        SamplingParams(n=3, temperature=1.0, min_p=0.05, seed=2, frequency_penalty=0.5),
    ]
    seqs = [_seq(p, i, prompt=[1, 2], output=[3]) for i, p in enumerate(params)]
    seqs[3] = dataclasses.replace(seqs[3], num_samples=3)
    beam = ScheduledSequence(seq_id=9, token_ids=[1], start_pos=0, block_table=[0], do_sample=True,
                             sampling_params=SamplingParams(n=2, use_beam_search=True,
                                                            temperature=0.0),
                             num_candidates=4)
    seqs.append(beam)
    logits = _logits(len(seqs), 50, seed=21)
    greedy = logits[0].argmax().item()
    best = logits[4].topk(4).indices.tolist()
    copies = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: copies.append(t.shape) or tolist(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("item() in the sampler"))
    samples = sample(logits, seqs, _gen(1))
    assert len(copies) == 1
    assert [s.seq_id for s in samples] == [0, 1, 2, 3, 3, 3, 9]
    assert samples[0].token_id == greedy
    assert len(samples[1].top_logprobs) >= 3
    assert [token for token, _ in samples[-1].candidates] == best
