"""Prompt logprobs equal HF's on the same weights, through chunked prefill, the prefix
cache, preemption and parallel sampling; and the KV admission bound counts shared blocks once.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams
from pagedserve.engine.capacity import blocks_needed

PROMPTS = [list(range(10, 50)), [7, 8, 9], [300, 200, 100, 50, 25, 12, 6, 3, 2, 1] * 3, [42, 43]]
ENGINE = dict(device="cpu", dtype="float32", block_size=8, max_model_len=128)


@pytest.fixture(scope="module")
def model_dir(model_dirs):
    return model_dirs("llama-gqa")


@pytest.fixture(scope="module")
def hf_logprobs(model_dir):
    """Per prompt: [P, vocab] log-softmax of HF's logits; row i predicts token i + 1."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [torch.log_softmax(model(torch.tensor([p])).logits[0].float(), -1)
                for p in PROMPTS]


def _check(outputs, hf_logprobs, k: int) -> None:
    for prompt, output, ref in zip(PROMPTS, outputs, hf_logprobs, strict=True):
        scored = output.prompt_logprobs
        assert len(scored) == len(prompt) and scored[0] is None
        for i in range(1, len(prompt)):
            entry = scored[i]
            assert next(iter(entry)) == prompt[i]  # the prompt's own token first
            assert entry[prompt[i]] == pytest.approx(ref[i - 1, prompt[i]].item(), abs=1e-4)
            top = ref[i - 1].topk(k)
            assert set(entry) == {prompt[i], *top.indices.tolist()}
            for token, value in zip(top.indices.tolist(), top.values.tolist(), strict=True):
                assert entry[token] == pytest.approx(value, abs=1e-4)


def _generate(llm, k: int = 3, **params):
    params = {"temperature": 0.0, "max_tokens": 3, **params}
    return llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(prompt_logprobs=k, **params), use_tqdm=False)


@pytest.mark.parametrize("budget", [2048, 16], ids=["whole-prompts", "chunked-prefill"])
def test_prompt_logprobs_equal_hf(model_dir, hf_logprobs, budget):
    llm = LLM(str(model_dir), num_gpu_blocks=64, max_num_batched_tokens=budget, **ENGINE)
    _check(_generate(llm), hf_logprobs, 3)
    assert llm.get_memory_stats()["allocated_blocks"] == 0


def test_a_prefix_cache_hit_still_scores_every_prompt_token(model_dir, hf_logprobs):
    llm = LLM(str(model_dir), num_gpu_blocks=64, **ENGINE)
    llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=2),
                 use_tqdm=False)  # fills the prefix cache
    assert llm.get_memory_stats()["cached_blocks"] > 0
    _check(_generate(llm, k=0), hf_logprobs, 0)


def test_preempted_and_parallel_requests_score_their_prompt_once(model_dir, hf_logprobs):
    # Room for about two requests at a time: the others are preempted and recomputed.
    llm = LLM(str(model_dir), num_gpu_blocks=16, max_num_batched_tokens=24, **ENGINE)
    outputs = _generate(llm, k=1, n=2, temperature=1.0, seed=3, max_tokens=12)
    assert llm.get_memory_stats()["num_preemptions"] > 0
    _check(outputs, hf_logprobs, 1)
    assert all(len(o.outputs) == 2 for o in outputs)


def test_prompt_logprobs_are_validated():
    with pytest.raises(ValueError,
                       match=r"SamplingParams.prompt_logprobs=21: must be in \[0, 20\]"):
        SamplingParams(prompt_logprobs=21)


# -- admission: a request's blocks, its prompt's full blocks shared by its sequences ------------

def test_blocks_needed_counts_shared_prompt_blocks_once():
    beams = SamplingParams(use_beam_search=True, best_of=4, temperature=0.0, max_tokens=8)
    # The example: 17 shared blocks + 4 beams x 2 own blocks.
    assert blocks_needed(140, beams, max_model_len=1024, block_size=8) == 25
    assert blocks_needed(140, SamplingParams(max_tokens=8), 1024, 8) == 19


@pytest.mark.parametrize("pool, admitted", [(25, True), (24, False)])
def test_beam_search_is_admitted_at_its_real_bound(model_dir, pool, admitted):
    prompt = [(i * 7) % 400 + 6 for i in range(140)]
    params = SamplingParams(use_beam_search=True, best_of=4, temperature=0.0, max_tokens=8,
                            ignore_eos=True)
    llm = LLM(str(model_dir), num_gpu_blocks=pool, max_num_batched_tokens=256, swap_space=0,
              enable_prefix_caching=False, **{**ENGINE, "max_model_len": 160})
    if not admitted:
        with pytest.raises(ValueError,
                           match="needs up to 25 KV blocks .* more than the pool's 24"):
            llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        return
    (output,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    roomy = LLM(str(model_dir), num_gpu_blocks=200, max_num_batched_tokens=256,
                **{**ENGINE, "max_model_len": 160})
    (reference,) = roomy.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    assert [c.token_ids for c in output.outputs] == [c.token_ids for c in reference.outputs]
    stats = llm.get_memory_stats()
    assert stats["num_preemptions"] == 0 and stats["allocated_blocks"] == 0
