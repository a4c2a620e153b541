"""The beam-search policy picks what HF transformers' beam search picks.

The policy is driven like the engine drives it: each step, every live beam's
best next tokens go in and the surviving beams come out. The reference is
``model.generate(num_beams=..., do_sample=False)`` on the same weights; a logits
processor records the beams HF scores each step, so the live beams must agree at
every step and in order, not just the returned hypotheses.

* Model-driven: log-probs come from the tiny random Llama, recomputed here without
  a KV cache, so they differ from generate's in the last bits; tokens must match
  and scores agree to 1e-4. The EOS set holds tokens this model emits often,
  so beams finish early and the finished-hypothesis paths run.
* Scripted: a logits processor replaces HF's log-probs with a pseudo-random
  function of the sequence, and the policy is fed that same function, so both
  see bit-identical inputs: scores must match exactly, which pins the float32
  arithmetic, and widths, penalties and EOS sets can vary more cheaply.
* Hand-made: a float32 tie that only HF's exact stopping test resolves.
"""

from __future__ import annotations

import functools
import random
import zlib
from collections.abc import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from pagedserve.scheduler.beam_search import Beam, BeamSearch, Hypothesis

PAD = 2  # the random model's pad id: HF fills finished short hypotheses with it
MAX_NEW_TOKENS = 12
PROMPTS = [[9], [300, 17, 42, 211, 8], [random.Random(5).randrange(6, 512) for _ in range(17)]]
MODEL_EOS = (468, 435)  # frequent in this model's beams (seed 0) for PROMPTS


@pytest.fixture(scope="module")
def model(tiny_llama):
    # One thread: fastest for these tiny matrices, and no stalls when other work shares the CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_logprobs(model):
    """Full (uncached) forward over a batch of equal-length sequences, memoised per sequence."""
    cache: dict[tuple[int, ...], torch.Tensor] = {}

    def get(seqs: list[list[int]]) -> list[torch.Tensor]:
        todo = [s for s in dict.fromkeys(map(tuple, seqs)) if s not in cache]
        if todo:
            with torch.inference_mode():
                logits = model(torch.tensor(todo)).logits[:, -1].float()
            cache.update(zip(todo, torch.log_softmax(logits, dim=-1), strict=True))
        return [cache[tuple(s)] for s in seqs]

    return get


def _scripted(seq: list[int], eos: tuple[int, ...], eos_boost: float) -> torch.Tensor:
    """Pseudo-random float32 log-probs over the 512 tokens that depend only on ``seq``."""
    gen = torch.Generator().manual_seed(zlib.crc32(str(seq).encode()))
    logits = torch.randn(512, generator=gen) * 3.0
    logits[list(eos)] += eos_boost
    return torch.log_softmax(logits, dim=-1)


class _Recorder(LogitsProcessor):
    """Records the sequences HF scores each step (its live beams, in its order).

    With a ``script``, the log-probs HF ranks by are replaced by ``script(sequence)``.
    """

    def __init__(self, script: Callable[[list[int]], torch.Tensor] | None = None) -> None:
        self.script = script
        self.steps: list[list[list[int]]] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = input_ids.tolist()
        self.steps.append(rows)
        return scores if self.script is None else torch.stack([self.script(r) for r in rows])


def _run_hf(model, prompt: list[int], eos: tuple[int, ...], recorder: _Recorder, **kwargs
            ) -> list[tuple[list[int], float]]:
    """generate()'s returned hypotheses as (generated tokens, score), prompt and padding cut."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
            eos_token_id=list(eos) or None, pad_token_id=PAD, output_scores=True,
            return_dict_in_generate=True, logits_processor=LogitsProcessorList([recorder]),
            **kwargs)
    results = []
    for seq, score in zip(out.sequences.tolist(), out.sequences_scores.tolist(), strict=True):
        tokens = seq[len(prompt):]
        end = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
        assert all(t == PAD for t in tokens[end:]), tokens  # hypotheses end at their EOS
        results.append((tokens[:end], score))
    return results


def _run_policy(policy: BeamSearch, prompt: list[int],
                logprobs: Callable[[list[list[int]]], list[torch.Tensor]]
                ) -> tuple[list[Hypothesis], list[list[list[int]]]]:
    """Drive the policy as the engine does; also return each step's live sequences."""
    beams, steps = [Beam([], 0.0)], []
    while True:
        steps.append([prompt + b.output_token_ids for b in beams])
        top = []
        for row in logprobs(steps[-1]):
            values, tokens = torch.topk(row, policy.candidates_per_beam)
            top.append(list(zip(tokens.tolist(), values.tolist(), strict=True)))
        chosen = policy.step(beams, top)
        if not chosen:
            break
        beams = [Beam(beams[p].output_token_ids + [t], s) for p, t, s in chosen]
    assert policy.done
    return policy.finalize(), steps


def _compare(model, prompt: list[int], width: int, num_return: int, length_penalty: float,
             early_stopping: bool | str, eos: tuple[int, ...],
             logprobs: Callable[[list[list[int]]], list[torch.Tensor]],
             script: Callable[[list[int]], torch.Tensor] | None = None
             ) -> tuple[list[Hypothesis], list[tuple[list[int], float]]]:
    """Run both; the live beams must agree at every step, in order."""
    recorder = _Recorder(script)
    expected = _run_hf(model, prompt, eos, recorder, num_beams=width,
                       num_return_sequences=num_return, length_penalty=length_penalty,
                       early_stopping=early_stopping)
    policy = _policy(width, num_return, length_penalty, early_stopping, eos)
    got, steps = _run_policy(policy, prompt, logprobs)
    # HF's first step scores num_beams copies of the prompt, the policy's one beam.
    assert recorder.steps[0] == [prompt] * width and steps[0] == [prompt]
    assert steps[1:] == recorder.steps[1:]
    assert [h.output_token_ids for h in got] == [tokens for tokens, _ in expected]
    return got, expected


def _policy(width: int, num_return: int, length_penalty: float, early_stopping: bool | str,
            eos: tuple[int, ...], max_new_tokens: int = MAX_NEW_TOKENS) -> BeamSearch:
    return BeamSearch(num_beams=width, num_return_sequences=num_return,
                      length_penalty=length_penalty, early_stopping=early_stopping,
                      eos_token_ids=frozenset(eos), max_new_tokens=max_new_tokens)


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
@pytest.mark.parametrize("width", [2, 4])
def test_matches_hf_generate_on_the_model(model, model_logprobs, width, length_penalty,
                                          early_stopping):
    for prompt in PROMPTS:
        for num_return in (1, width):
            got, expected = _compare(model, prompt, width, num_return, length_penalty,
                                     early_stopping, MODEL_EOS, model_logprobs)
            assert [h.score for h in got] == pytest.approx([s for _, s in expected], abs=1e-4)


def test_model_beams_finish_on_eos(model_logprobs):
    """MODEL_EOS makes hypotheses end early, so those paths are really compared."""
    hyps = []
    for prompt in PROMPTS:
        hyps += _run_policy(_policy(4, 4, 1.0, False, MODEL_EOS), prompt, model_logprobs)[0]
    assert any(h.output_token_ids[-1] in MODEL_EOS and len(h.output_token_ids) < MAX_NEW_TOKENS
               for h in hyps)
    assert any(len(h.output_token_ids) == MAX_NEW_TOKENS for h in hyps)


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0, 0.5, -1.5])
@pytest.mark.parametrize("width, eos, eos_boost", [
    (2, (), 0.0), (4, (7,), 6.0), (3, (7, 11), 6.0),
    (2, (7, 11, 13), 6.0),  # often more EOS than num_beams among the top candidates
], ids=["2-no-eos", "4-one-eos", "3-two-eos", "2-three-eos"])
def test_matches_hf_generate_bit_for_bit(model, width, eos, eos_boost, length_penalty,
                                         early_stopping):
    script = functools.partial(_scripted, eos=eos, eos_boost=eos_boost)
    for prompt in PROMPTS[:2]:
        got, expected = _compare(model, prompt, width, width, length_penalty, early_stopping,
                                 eos, lambda seqs: [script(s) for s in seqs], script)
        assert [h.score for h in got] == [score for _, score in expected]


def test_a_live_beam_that_only_ties_the_worst_hypothesis_stops_the_search(model):
    """Hand-made log-probs, exact in float32; two beams, EOS 1, length_penalty 1.

    Step 1: EOS finishes at -1/1; [10] (-1.25) and [11] (-1.5) live on. Step 2: [10, EOS]
    finishes at -1.75/2 (the length counts the EOS). The best live beam [10, 20] scores
    -2/2, only equal to the worst hypothesis, so HF stops, although one more step would
    have found [10, 20, EOS] at -2.5/3.
    """
    table = {(): {1: -1.0, 10: -1.25, 11: -1.5, 12: -3.0}, (10,): {1: -0.5, 20: -0.75},
             (11,): {21: -1.0, 1: -2.0}, (10, 20): {1: -0.5}}

    def script(seq: list[int]) -> torch.Tensor:
        logprobs = -20.0 - 0.01 * torch.arange(512, dtype=torch.float32)
        for token, logprob in table.get(tuple(seq[1:]), {}).items():
            logprobs[token] = logprob
        return logprobs

    got, expected = _compare(model, [9], 2, 2, 1.0, False, (1,),
                             lambda seqs: [script(s) for s in seqs], script)
    assert expected == [([10, 1], -0.875), ([1], -1.0)]
    assert [h.score for h in got] == [-0.875, -1.0]


def test_candidates_per_beam_leaves_num_beams_that_do_not_stop():
    assert _policy(3, 1, 1.0, False, ()).candidates_per_beam == 6
    assert _policy(3, 1, 1.0, False, (1,)).candidates_per_beam == 6
    assert _policy(3, 1, 1.0, False, (1, 5, 9)).candidates_per_beam == 12


@pytest.mark.parametrize("field, kwargs", [
    ("num_beams", {"num_beams": 0, "num_return_sequences": 1}),
    ("num_return_sequences", {"num_beams": 2, "num_return_sequences": 3}),
    ("num_return_sequences", {"num_return_sequences": 0}),
    ("early_stopping", {"early_stopping": "always"}),
    ("early_stopping", {"early_stopping": 1}),
    ("length_penalty", {"length_penalty": float("nan")}),
    ("max_new_tokens", {"max_new_tokens": 0}),
    ("eos_token_ids", {"eos_token_ids": {-1}}),
])
def test_invalid_arguments_name_the_field(field, kwargs):
    args = {"num_beams": 2, "num_return_sequences": 1, "length_penalty": 1.0,
            "early_stopping": False, "eos_token_ids": frozenset({1}), "max_new_tokens": 4}
    with pytest.raises(ValueError, match=field):
        BeamSearch(**(args | kwargs))


def test_misuse_raises():
    policy = _policy(2, 1, 1.0, False, (1,))
    with pytest.raises(ValueError, match="beams"):
        policy.step([Beam([], 0.0)] * 2, [[(3, -1.0)] * 4] * 2)  # the first step has one beam
    with pytest.raises(ValueError, match="top_tokens"):
        policy.step([Beam([], 0.0)], [[(3, -1.0)] * 3])
    with pytest.raises(RuntimeError, match="finalize"):
        policy.finalize()


def test_a_single_new_token_ends_the_search_at_once():
    """At max_new_tokens every candidate stops; the top num_beams become hypotheses."""
    policy = _policy(2, 2, 2.0, False, (1,), max_new_tokens=1)
    assert policy.step([Beam([], 0.0)], [[(3, -1.0), (1, -2.0), (4, -3.0), (5, -4.0)]]) == []
    assert policy.done
    assert policy.finalize() == [Hypothesis([3], -1.0, -1.0), Hypothesis([1], -2.0, -2.0)]
    with pytest.raises(RuntimeError, match="step"):
        policy.step([Beam([3], -1.0)] * 2, [[(3, -1.0)] * 4] * 2)
