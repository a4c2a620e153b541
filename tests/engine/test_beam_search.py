"""Beam search through the engine returns what HF transformers' beam search returns.

Beams fork by sharing blocks (copy-on-write) and dropped beams free theirs; the
returned hypotheses must equal HF's token for token, in HF's order, with and
without memory pressure.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams

EXTRA_EOS = [468, 435]  # tokens this model often emits: beams finish early on them
PAD = 2
MAX_TOKENS = 12
PROMPTS = [[9], [300, 17, 42, 211, 8], [random.Random(5).randrange(6, 512) for _ in range(17)]]


@pytest.fixture(scope="module")
def hf_model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def _hf_beams(model, prompt, width, n, length_penalty, eos):
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=n,
                             do_sample=False, max_new_tokens=MAX_TOKENS,
                             length_penalty=length_penalty, early_stopping=False,
                             eos_token_id=eos, pad_token_id=PAD)
    beams = []
    for row in out[:, len(prompt):].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        beams.append(row[:end])  # HF pads hypotheses that ended early
    return beams


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
@pytest.mark.parametrize("width,n", [(2, 2), (4, 4), (4, 1)])
def test_equals_hf(tiny_llama, hf_model, width, n, length_penalty):
    llm = LLM(str(tiny_llama), block_size=8, max_model_len=64, dtype="float32", device="cpu",
              num_gpu_blocks=64)
    params = SamplingParams(n=n, best_of=width, use_beam_search=True, temperature=0.0,
                            max_tokens=MAX_TOKENS, length_penalty=length_penalty,
                            stop_token_ids=EXTRA_EOS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)

    eos = sorted(llm.engine.info.eos_token_ids | set(EXTRA_EOS))
    ended_early = 0
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        expected = _hf_beams(hf_model, prompt, width, n, length_penalty, eos)
        assert [c.token_ids for c in output.outputs] == expected, f"prompt {prompt[:3]}..."
        ended_early += sum(c.finish_reason == "stop" for c in output.outputs)
    if n == width:  # all hypotheses returned: some must have finished on EOS
        assert ended_early > 0, "no hypothesis ended on EOS: the finished-beam path went untested"
    stats = llm.get_memory_stats()
    assert stats["free_blocks"] == stats["total_blocks"] and stats["logical_blocks"] == 0


def test_beams_share_blocks_and_survive_swapping(tiny_llama):
    """Width 4 under a pool too small for everything: swapped out and back, same answer."""
    params = SamplingParams(n=4, best_of=4, use_beam_search=True, temperature=0.0,
                            max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]

    def run(**options):
        llm = LLM(str(tiny_llama), block_size=8, max_model_len=32, dtype="float32",
                  device="cpu", **options)
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.get_memory_stats()
        assert stats["free_blocks"] == stats["total_blocks"] and stats["swapped_blocks"] == 0
        return stats, [[c.token_ids for c in out.outputs] for out in outs]

    _, roomy = run(num_gpu_blocks=64)
    tight_stats, tight = run(num_gpu_blocks=16, swap_space=0.01)
    assert tight == roomy
    assert tight_stats["num_swap_preemptions"] > 0
    recompute_stats, recomputed = run(num_gpu_blocks=16, preemption_mode="recompute")
    assert recomputed == roomy
    assert recompute_stats["num_preemptions"] > 0


def test_sampling_knobs_are_ignored_as_hf_does(tiny_llama, hf_model, caplog):
    """vLLM users' beam search: temperature and top_k given, ignored with one warning, as
    transformers' generate(num_beams=5, do_sample=False) ignores them."""
    with caplog.at_level("WARNING", logger="pagedserve"):
        params = SamplingParams(temperature=1.0, top_k=1, use_beam_search=True, best_of=5,
                                max_tokens=MAX_TOKENS)
    [warning] = [r for r in caplog.records if r.name.startswith("pagedserve")]
    assert "temperature=1.0" in warning.getMessage() and "top_k=1" in warning.getMessage()
    llm = LLM(str(tiny_llama), block_size=8, max_model_len=64, dtype="float32", device="cpu",
              num_gpu_blocks=64)
    caplog.clear()
    with caplog.at_level("WARNING", logger="pagedserve"):
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params,
                               use_tqdm=False)
    assert not [r for r in caplog.records if "use_beam_search" in r.getMessage()]  # once only
    eos = sorted(llm.engine.info.eos_token_ids)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        [best] = _hf_beams(hf_model, prompt, 5, 1, 1.0, eos)
        assert [c.token_ids for c in output.outputs] == [best], f"prompt {prompt[:3]}..."


def test_default_temperature_is_no_knob_given(caplog):
    """SamplingParams(use_beam_search=True, best_of=4) sets no knob: nothing to warn about."""
    with caplog.at_level("WARNING", logger="pagedserve"):
        params = SamplingParams(use_beam_search=True, best_of=4, max_tokens=256)
    assert params.temperature == 0.0 and not caplog.records
