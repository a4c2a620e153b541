"""The batched sampler on hand-made logits: filters, temperature, seeds, logprobs.

Penalties: test_sampler_penalties.py."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from support.sampler_cases import gen as _gen
from support.sampler_cases import seq as _seq

from pagedserve.sampling_params import SamplingParams
from pagedserve.worker import sampler
from pagedserve.worker.sampler import SamplingBatch, needs_logprobs, sample


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    batch = SamplingBatch.build([_seq(p, i) for i, p in enumerate(params)], logits.shape[1],
                                logits.device)
    return sampler._filter(logits, batch)


def _logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=_gen(seed)) * scale


def _tokens(samples) -> list[int]:
    return [s.token_id for s in samples]


def _frequencies(tokens: list[int], vocab: int) -> list[float]:
    counts = torch.bincount(torch.tensor(tokens), minlength=vocab).double()
    return (counts / counts.sum()).tolist()


# -- greedy and filters that reduce to greedy --------------------------------------------

def test_greedy_picks_argmax():
    logits = _logits(16, 40)
    params = SamplingParams(temperature=0.0)
    seqs = [_seq(params, i) for i in range(16)]
    samples = sample(logits, seqs, _gen())
    assert _tokens(samples) == logits.argmax(dim=-1).tolist()
    assert [s.seq_id for s in samples] == list(range(16))
    assert all(s.top_logprobs is None for s in samples)


def test_greedy_ignores_generator_and_filters():
    logits = _logits(8, 30, seed=1)
    params = SamplingParams(temperature=0.0, top_k=5, top_p=0.3, min_p=0.2)
    seqs = [_seq(params, i) for i in range(8)]
    first = _tokens(sample(logits, seqs, _gen(1)))
    second = _tokens(sample(logits, seqs, _gen(2)))
    assert first == second == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=1.0, top_p=1e-6),
    SamplingParams(temperature=1.7, top_k=1),
    SamplingParams(temperature=1.0, min_p=1.0),
], ids=["top_k=1", "tiny top_p", "top_k=1 hot", "min_p=1"])
def test_degenerate_filters_equal_greedy(params):
    logits = _logits(64, 50, seed=2, scale=1.0)  # flat: unfiltered sampling would rarely be argmax
    seqs = [_seq(params, i) for i in range(64)]
    for seed in range(3):
        assert _tokens(sample(logits, seqs, _gen(seed))) == logits.argmax(dim=-1).tolist()


def test_greedy_and_random_rows_in_one_batch():
    logits = _logits(6, 20, seed=3)
    greedy = SamplingParams(temperature=0.0)
    hot = SamplingParams(temperature=1.0)
    seqs = [_seq(greedy if i % 2 == 0 else hot, i) for i in range(6)]
    tokens = _tokens(sample(logits, seqs, _gen(4)))
    argmax = logits.argmax(dim=-1).tolist()
    assert [tokens[i] for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]


# -- filters keep exactly the tokens they should ---------------------------------------------

PROBS = [0.5, 0.3, 0.15, 0.05]


def _draw_many(probs: list[float], params: SamplingParams, rows: int = 4000, seed: int = 0):
    logits = torch.tensor(probs).log().expand(rows, len(probs)).contiguous()
    seqs = [_seq(params, i) for i in range(rows)]
    return _tokens(sample(logits, seqs, _gen(seed)))


@pytest.mark.parametrize("params, allowed", [
    (SamplingParams(top_k=2), {0, 1}),
    (SamplingParams(top_k=3), {0, 1, 2}),
    (SamplingParams(top_p=0.7), {0, 1}),  # 0.5 < 0.7 <= 0.5 + 0.3
    (SamplingParams(top_p=0.85), {0, 1, 2}),  # 0.8 < 0.85
    (SamplingParams(min_p=0.5), {0, 1}),  # p >= 0.5 * 0.5
    (SamplingParams(min_p=0.2), {0, 1, 2}),  # p >= 0.2 * 0.5
    (SamplingParams(top_k=3, min_p=0.5), {0, 1}),
    (SamplingParams(top_k=3, top_p=0.6), {0, 1}),  # top-p over the top-3 renormalized
])
def test_filters_keep_exactly_the_allowed_tokens(params, allowed):
    tokens = _draw_many(PROBS, params)
    assert set(tokens) == allowed


def test_filter_renormalizes_kept_tokens():
    tokens = _draw_many(PROBS, SamplingParams(top_k=2), rows=20000)
    freqs = _frequencies(tokens, 4)
    assert freqs[0] == pytest.approx(0.5 / 0.8, abs=0.02)
    assert freqs[1] == pytest.approx(0.3 / 0.8, abs=0.02)


def test_filter_masks_directly():
    logits = torch.tensor(PROBS).log()[None, :].repeat(3, 1)
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.7), SamplingParams(min_p=0.5)]
    out = _filter(logits, params)
    keep = torch.isfinite(out)
    assert keep.tolist() == [[True, True, False, False]] * 3
    assert torch.equal(out[keep], logits[keep])  # kept logits are untouched


def test_disabled_filters_keep_everything():
    logits = _logits(2, 10, seed=5)
    out = _filter(logits, [SamplingParams(), SamplingParams(top_k=0, top_p=1.0, min_p=0.0)])
    assert torch.equal(out, logits)


# -- temperature ----------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_distribution(temperature):
    probs = torch.tensor([0.6, 0.3, 0.1])
    expected = probs ** (1.0 / temperature)
    expected = (expected / expected.sum()).tolist()
    tokens = _draw_many(probs.tolist(), SamplingParams(temperature=temperature), rows=20000, seed=7)
    freqs = _frequencies(tokens, 3)
    for got, want in zip(freqs, expected, strict=True):
        assert got == pytest.approx(want, abs=0.02), (freqs, expected)


def test_lower_temperature_is_more_peaked():
    probs = [0.4, 0.3, 0.2, 0.1]
    top = [_frequencies(_draw_many(probs, SamplingParams(temperature=t), rows=8000, seed=8), 4)[0]
           for t in (3.0, 1.0, 0.3)]
    assert top[0] < top[1] < top[2]


# -- seeds -----------------------------------------------------------------------------------------

VOCAB = 1000


def _flat_row(seed: int = 11) -> torch.Tensor:
    return torch.randn(1, VOCAB, generator=_gen(seed)) * 0.1  # nearly uniform: the noise decides


def test_seeded_row_independent_of_batch_and_generator():
    row = _flat_row()
    params = SamplingParams(temperature=0.8, seed=1234)
    alone = sample(row, [_seq(params, 0, output_index=3)], _gen(0))[0].token_id

    others = _logits(5, VOCAB, seed=12, scale=1.0)
    hot = SamplingParams(temperature=1.0)
    for position in range(6):
        batch = torch.cat([others[:position], row, others[position:]])
        seqs = [_seq(hot, 100 + i) for i in range(5)]
        seqs.insert(position, _seq(params, 0, output_index=3))
        for gen_seed in (1, 99):
            torch.manual_seed(gen_seed * 7)  # the global state must not matter either
            got = sample(batch, seqs, _gen(gen_seed))[position].token_id
            assert got == alone, (position, gen_seed)


def test_forked_sample_keeps_its_stream_next_to_a_prompt_sampled_n_times():
    """A forked sample (sample_index 1) draws from its own seeded stream, also in a
    step where another request's prompt row is expanded into several samples."""
    import dataclasses

    row = _flat_row()
    params = SamplingParams(n=2, temperature=0.8, seed=9)
    forked = dataclasses.replace(_seq(params, 1, output_index=4), sample_index=1)
    alone = sample(row, [forked], _gen(0))[0].token_id
    prompt_end = dataclasses.replace(_seq(SamplingParams(n=3, seed=3), 2), num_samples=3)
    batch = torch.cat([row, _flat_row(seed=12)])
    samples = sample(batch, [forked, prompt_end], _gen(0))
    assert samples[0].token_id == alone
    sibling = dataclasses.replace(forked, sample_index=0)
    assert sample(row, [sibling], _gen(0))[0].token_id != alone  # the index matters here


def test_seeded_rows_differ_across_output_index_and_seed():
    row = _flat_row()
    by_index = [sample(row, [_seq(SamplingParams(seed=5), output_index=i)], _gen(i))[0].token_id
                for i in range(12)]
    assert len(set(by_index)) >= 8  # a uniform draw over 1000 tokens rarely repeats
    by_seed = [sample(row, [_seq(SamplingParams(seed=s), output_index=0)], _gen(0))[0].token_id
               for s in range(12)]
    assert len(set(by_seed)) >= 8
    # ...and each is reproducible.
    again = [sample(row, [_seq(SamplingParams(seed=5), output_index=i)], _gen(100 + i))[0].token_id
             for i in range(12)]
    assert again == by_index


def test_same_seed_same_index_same_token_in_one_batch():
    rows = _flat_row().repeat(4, 1)
    params = SamplingParams(seed=77)
    seqs = [_seq(params, i, output_index=2) for i in range(4)]
    tokens = _tokens(sample(rows, seqs, _gen(3)))
    assert len(set(tokens)) == 1


def test_unseeded_rows_follow_the_generator():
    rows = _flat_row().repeat(8, 1)
    seqs = [_seq(SamplingParams(), i) for i in range(8)]
    a = _tokens(sample(rows, seqs, _gen(1)))
    b = _tokens(sample(rows, seqs, _gen(1)))
    c = _tokens(sample(rows, seqs, _gen(2)))
    assert a == b
    assert a != c
    assert len(set(a)) > 1  # rows draw independently


def test_seeded_sampling_still_respects_filters():
    logits = torch.tensor(PROBS).log()[None, :]
    for index in range(50):
        seq = _seq(SamplingParams(seed=3, top_k=2), output_index=index)
        assert sample(logits, [seq], _gen())[0].token_id in (0, 1)


def test_seeded_sampling_follows_the_distribution():
    probs = [0.6, 0.3, 0.1]
    logits = torch.tensor(probs).log()[None, :]
    tokens = [sample(logits, [_seq(SamplingParams(seed=42), output_index=i)], _gen())[0].token_id
              for i in range(3000)]
    for got, want in zip(_frequencies(tokens, 3), probs, strict=True):
        assert got == pytest.approx(want, abs=0.035)


# -- returned log-probabilities -----------------------------------------------------------------

def test_logprob_is_raw_log_softmax_with_penalties_and_temperature():
    logits = _logits(6, 25, seed=13)
    raw = logits.clone()
    params = [dataclasses.replace(p, logprobs=0) for p in (
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.3),
        SamplingParams(temperature=2.0, top_k=4),
        SamplingParams(temperature=0.0, repetition_penalty=3.0, presence_penalty=1.5),
        SamplingParams(temperature=0.7, frequency_penalty=2.0, top_p=0.5, seed=9),
        SamplingParams(temperature=1.2, repetition_penalty=0.5, min_p=0.1),
    )]
    seqs = [_seq(p, i, prompt=[0, 1, 2], output=[3, 3, 4]) for i, p in enumerate(params)]
    samples = sample(logits, seqs, _gen(5))
    assert torch.equal(logits, raw), "sample modified the caller's logits"
    expected = torch.log_softmax(raw.double(), dim=-1)
    for i, s in enumerate(samples):
        assert s.logprob == pytest.approx(expected[i, s.token_id].item(), abs=1e-5)


def test_logprobs_are_computed_only_for_the_rows_that_use_them():
    """Rows asking for none get NaN; the others get the same values as in a batch where
    every row asks."""
    logits = _logits(4, 25, seed=15)
    asked = [SamplingParams(temperature=0.0, logprobs=0), SamplingParams(temperature=0.0),
             SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.0)]
    samples = sample(logits.clone(), [_seq(p, i) for i, p in enumerate(asked)], _gen())
    every = sample(logits.clone(), [
        _seq(p if p.logprobs is not None else dataclasses.replace(p, logprobs=0), i)
        for i, p in enumerate(asked)], _gen())
    assert [s.token_id for s in samples] == [s.token_id for s in every]
    assert math.isnan(samples[1].logprob) and math.isnan(samples[3].logprob)
    assert samples[0].logprob == every[0].logprob and samples[2].logprob == every[2].logprob
    assert samples[2].top_logprobs == every[2].top_logprobs
    assert needs_logprobs(_seq(SamplingParams(n=2, best_of=3, temperature=1.0)))
    assert not needs_logprobs(_seq(SamplingParams(n=2, temperature=1.0)))


def test_greedy_with_penalties_picks_penalized_argmax_but_reports_raw_logprob():
    raw = torch.tensor([[5.0, 4.0, 3.0, 1.0, 0.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=10.0, logprobs=0)
    (s,) = sample(raw.clone(), [_seq(params, prompt=[0, 1, 2], output=[])], _gen())
    # Penalized: [0.5, 0.4, 0.3, 1.0, 0.0] -> token 3.
    assert s.token_id == 3
    assert s.logprob == pytest.approx(torch.log_softmax(raw, dim=-1)[0, 3].item(), abs=1e-6)


def test_logprobs_k_returns_sampled_token_then_top_k():
    logits = _logits(3, 30, seed=14)
    expected = torch.log_softmax(logits.double(), dim=-1)
    params = [SamplingParams(temperature=0.0, logprobs=5),
              SamplingParams(temperature=1.0, logprobs=2, seed=1),
              SamplingParams(temperature=0.0)]
    samples = sample(logits, [_seq(p, i) for i, p in enumerate(params)], _gen())
    for i, k in ((0, 5), (1, 2)):
        s = samples[i]
        top = s.top_logprobs
        assert next(iter(top)) == s.token_id
        assert top[s.token_id] == pytest.approx(s.logprob)
        top_ids = expected[i].topk(k).indices.tolist()
        assert set(top) == set(top_ids) | {s.token_id}
        assert len(top) == (k if s.token_id in top_ids else k + 1)
        for token, value in top.items():
            assert value == pytest.approx(expected[i, token].item(), abs=1e-5)
    assert samples[2].top_logprobs is None


def test_logprobs_when_sampled_token_is_outside_top_k():
    raw = torch.tensor([[5.0, 4.0, 3.0, 1.0, 0.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=10.0, logprobs=2)
    (s,) = sample(raw, [_seq(params, prompt=[0, 1, 2], output=[])], _gen())
    lp = torch.log_softmax(raw, dim=-1)[0]
    assert s.token_id == 3
    assert list(s.top_logprobs) == [3, 0, 1]
    assert list(s.top_logprobs.values()) == pytest.approx([lp[3].item(), lp[0].item(),
                                                           lp[1].item()])


def test_logprobs_zero_returns_only_the_sampled_token():
    logits = _logits(2, 10, seed=15)
    params = [SamplingParams(temperature=0.0, logprobs=0),
              SamplingParams(temperature=0.0, logprobs=3)]
    samples = sample(logits, [_seq(p, i) for i, p in enumerate(params)], _gen())
    assert samples[0].top_logprobs == {samples[0].token_id: pytest.approx(samples[0].logprob)}
    assert len(samples[1].top_logprobs) == 3
    only = sample(logits[:1], [_seq(params[0])], _gen())[0]
    assert only.top_logprobs == {only.token_id: pytest.approx(only.logprob)}
