"""The logits controls vLLM users send beside structured outputs, in the batched
sampler (applied on the device) and through the engine: logit_bias,
allowed_token_ids and min_tokens (EOS and stop ids blocked until then).

The reference applies each control to each row in plain Python, one token at a
time; greedy rows must pick the reference's argmax and seeded rows must draw what
the same seed draws from the reference's logits. Returned logprobs stay the raw
model's.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from support.sampler_cases import gen as _gen
from support.sampler_cases import seq as _seq

from pagedserve import LLM, SamplingParams
from pagedserve.worker.sampler import sample

VOCAB = 40


def _reference(logits: torch.Tensor, seqs) -> torch.Tensor:
    out = logits.clone()
    for row, seq in enumerate(seqs):
        params = seq.sampling_params
        for token, value in (params.logit_bias or {}).items():
            out[row, token] += value
        if params.allowed_token_ids is not None:
            for token in range(out.shape[1]):
                if token not in params.allowed_token_ids:
                    out[row, token] = -math.inf
        for token in seq.blocked_token_ids or ():
            out[row, token] = -math.inf
    return out


def _batch():
    seqs = [_seq(SamplingParams(temperature=0.0, logit_bias={3: 100.0, "7": -5.0}), 0),
            _seq(SamplingParams(temperature=0.0, allowed_token_ids=[5, 9, 11]), 1),
            dataclasses.replace(_seq(SamplingParams(temperature=0.0, min_tokens=4), 2),
                                blocked_token_ids=[0, 1]),
            _seq(SamplingParams(temperature=0.0), 3),
            _seq(SamplingParams(temperature=0.8, seed=5, allowed_token_ids=[2, 4, 6],
                                logit_bias={4: 2.0}), 4),
            _seq(SamplingParams(temperature=0.8, seed=5, max_tokens=16), 5)]
    logits = torch.randn(len(seqs), VOCAB, generator=_gen(1)) * 3
    logits[2, 0] = logits[2, 1] = 50.0  # EOS and a stop id are the likeliest: blocked
    return seqs, logits


def test_controls_equal_the_reference_and_leave_logprobs_raw():
    seqs, logits = _batch()
    samples = sample(logits.clone(), seqs, torch.Generator().manual_seed(0))
    processed = _reference(logits, seqs)
    greedy = [0, 1, 2, 3]
    assert [samples[i].token_id for i in greedy] == processed[greedy].argmax(dim=-1).tolist()
    assert samples[0].token_id == 3 and samples[1].token_id in (5, 9, 11)
    assert samples[2].token_id not in (0, 1)
    assert samples[4].token_id in (2, 4, 6)
    # The seeded row draws what the same seed draws from the reference's logits.
    plain = [dataclasses.replace(seqs[4], sampling_params=SamplingParams(
        temperature=0.8, seed=5))]
    assert sample(processed[4:5].clone(), plain,
                  torch.Generator().manual_seed(0))[0].token_id == samples[4].token_id
    # An unconstrained row beside them gives what it gives alone.
    alone = sample(logits[5:6].clone(), [seqs[5]], torch.Generator().manual_seed(0))
    assert alone[0].token_id == samples[5].token_id
    # Logprobs, where asked for, are the raw model's.
    asked = [dataclasses.replace(s, sampling_params=dataclasses.replace(s.sampling_params,
                                                                         logprobs=0))
             for s in seqs]
    raw = torch.log_softmax(logits, dim=-1)
    for row, sampled in enumerate(sample(logits.clone(), asked,
                                         torch.Generator().manual_seed(0))):
        assert sampled.token_id == samples[row].token_id
        assert math.isclose(sampled.logprob, raw[row, sampled.token_id].item(), abs_tol=1e-5)


def test_through_the_engine(tmp_path):
    from pagedserve.testing import build_random_model

    llm = LLM(str(build_random_model(tmp_path / "llama", arch="llama")), device="cpu",
              dtype="float32", num_gpu_blocks=64, max_model_len=128)
    eos = min(llm.engine.info.eos_token_ids)
    prompt = [{"prompt_token_ids": [5, 6, 7]}]
    # EOS made the likeliest token: min_tokens holds it back that long, then it ends.
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=20, min_tokens=6,
                                              logit_bias={eos: 100.0}),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and len(out.token_ids) == 7
    assert eos not in out.token_ids[:6]
    out = llm.generate(prompt, SamplingParams(temperature=1.0, seed=3, max_tokens=12,
                                              allowed_token_ids=[40, 41, 42]),
                       use_tqdm=False)[0].outputs[0]
    assert set(out.token_ids) <= {40, 41, 42} and len(out.token_ids) == 12
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=5,
                                              logit_bias={"77": 100}),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [77] * 5


def test_bad_words_ban_the_token_that_would_complete_one():
    base = SamplingParams(temperature=0.0)
    words = ((7,), (3, 4, 5), (9, 9))
    seqs = [dataclasses.replace(_seq(dataclasses.replace(base, bad_words=("x",),
                                                         bad_words_token_ids=words), row),
                                output_token_ids=output)
            for row, output in enumerate([[1, 3, 4], [3, 4, 6], [], [2, 9]])]
    logits = torch.zeros(len(seqs), VOCAB)
    logits[:, [5, 7, 9]] = 10.0  # the banned tokens are the likeliest
    logits[:, 8] = 5.0
    got = [s.token_id for s in sample(logits, seqs, torch.Generator().manual_seed(0))]
    # Row 0 ends with 3, 4: 5 would complete (3, 4, 5), and 7 is always banned: 9.
    # Rows 1 and 2: only 7 is banned (5 and 9 tie: the first). Row 3 ends with 9: 9
    # would complete (9, 9): 5.
    assert got == [9, 5, 5, 5]


def test_bad_words_through_the_engine(tmp_path):
    from pagedserve.testing import build_random_model

    llm = LLM(str(build_random_model(tmp_path / "llama", arch="llama")), device="cpu",
              dtype="float32", num_gpu_blocks=64, max_model_len=128)
    tokenizer = llm.get_tokenizer()
    prompt = [{"prompt_token_ids": [5, 6, 7]}]
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    free = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
    # An output token that is a word of its own, however it is tokenized.
    word, token = next((tokenizer.decode([t]).strip(), t) for t in free
                       if tokenizer.decode([t]).strip()
                       and tokenizer.encode(tokenizer.decode([t]).strip(),
                                            add_special_tokens=False) == [t])
    banned = llm.generate(prompt, dataclasses.replace(greedy, bad_words=[word]),
                          use_tqdm=False)[0].outputs[0].token_ids
    assert token not in banned and banned[:free.index(token)] == free[:free.index(token)]


def test_beam_search_refuses_the_controls_it_would_ignore():
    import pytest

    from pagedserve.errors import RequestError

    for controls in ({"logit_bias": {1: 1.0}}, {"allowed_token_ids": [1]}, {"min_tokens": 2},
                     {"bad_words": ["x"]}):
        name = next(iter(controls))
        with pytest.raises(RequestError, match=f"{name}=.*not supported with use_beam_search"):
            SamplingParams(use_beam_search=True, n=2, **controls)
