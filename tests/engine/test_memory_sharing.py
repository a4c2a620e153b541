"""Prefix caching, parallel sampling with copy-on-write, and preemption by swap or recompute.

Every run ends with the pool back to all free (cached blocks count as free:
nobody holds them) and nothing swapped.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams
from pagedserve.scheduler.step import StepInput

BLOCK_SIZE = 8
MAX_TOKENS = 12


def _prompts() -> list[list[int]]:
    """Long shared prefixes, exact repeats, and prompts sharing nothing."""
    rng = random.Random(7)
    system = [rng.randrange(6, 512) for _ in range(70)]
    other = [rng.randrange(6, 512) for _ in range(33)]
    suffixes = [[rng.randrange(6, 512) for _ in range(n)] for n in (1, 5, 9, 16)]
    return ([system + s for s in suffixes] + [system + suffixes[1]] + [other, other]
            + [system[:40]] + [system[:41]])


@pytest.fixture(scope="module")
def hf_greedy(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    results = []
    for prompt in _prompts():
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS,
                                 do_sample=False)
        results.append(out[0, len(prompt):].tolist())
    return results


def _assert_clean(llm: LLM) -> None:
    stats = llm.get_memory_stats()
    assert stats["free_blocks"] == stats["total_blocks"]
    assert stats["swapped_blocks"] == 0 and stats["logical_blocks"] == 0
    assert stats["num_running"] == stats["num_waiting"] == stats["num_swapped"] == 0


SETTINGS = {
    "no-prefix-cache": dict(enable_prefix_caching=False, num_gpu_blocks=138),
    "prefix-cache": dict(enable_prefix_caching=True, num_gpu_blocks=138),
    # A pool of 13 blocks holds about one request: they preempt each other.
    "recompute": dict(preemption_mode="recompute", num_gpu_blocks=13),
    "recompute-no-cache": dict(preemption_mode="recompute", num_gpu_blocks=13,
                               enable_prefix_caching=False),
    "swap": dict(preemption_mode="swap", num_gpu_blocks=13, swap_space=0.01),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_greedy_equals_hf(tiny_llama, hf_greedy, setting):
    options = SETTINGS[setting]
    llm = LLM(str(tiny_llama), block_size=BLOCK_SIZE, max_model_len=104, dtype="float32",
              device="cpu", max_num_batched_tokens=64, **options)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], params, use_tqdm=False)

    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy
    stats = llm.get_memory_stats()
    if options.get("enable_prefix_caching", True):
        assert stats["prefix_cache_hit_rate"] > 0.2
    else:
        assert stats["prefix_cache_hit_rate"] == 0 and stats["cached_blocks"] == 0
    if setting in ("recompute", "recompute-no-cache", "swap"):
        assert stats["num_preemptions"] > 0
        assert (stats["num_swap_preemptions"] > 0) == (setting == "swap")
    _assert_clean(llm)


def test_prefix_cache_skips_computing_the_shared_prefix(tiny_llama):
    llm = LLM(str(tiny_llama), block_size=BLOCK_SIZE, max_model_len=128, device="cpu",
              num_gpu_blocks=64)
    computed = []
    execute = llm.engine.executor.execute

    def spy(step: StepInput):
        computed.append(sum(seq.num_tokens for seq in step.seqs))
        return execute(step)

    llm.engine.executor.execute = spy
    prompt = list(range(10, 60))  # 50 tokens: 6 full blocks and 2 tokens
    params = SamplingParams(temperature=0.0, max_tokens=1)
    first = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
    second = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
    assert computed == [50, 50 - 6 * BLOCK_SIZE]
    assert first[0].outputs[0].token_ids == second[0].outputs[0].token_ids
    assert llm.get_memory_stats()["cached_blocks"] == 6


def _step_until(llm: LLM, predicate, limit: int = 50):
    for _ in range(limit):
        if predicate():
            return
        llm.engine.step()
    raise AssertionError("condition never reached")


@pytest.mark.parametrize("prompt_len,expected_copies", [(21, 3), (24, 0)])
def test_parallel_samples_share_the_prompt(tiny_llama, prompt_len, expected_copies):
    """n=4: prompt blocks held once; a shared partial block is copied by all but its last writer."""
    llm = LLM(str(tiny_llama), block_size=BLOCK_SIZE, max_model_len=64, device="cpu",
              num_gpu_blocks=64, enable_prefix_caching=False)
    copies = []
    execute = llm.engine.executor.execute

    def spy(step: StepInput):
        copies.append(list(step.blocks_to_copy))
        return execute(step)

    llm.engine.executor.execute = spy
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    llm.engine.add_request("r", list(range(10, 10 + prompt_len)), params)
    group = llm.engine.scheduler._groups["r"]
    _step_until(llm, lambda: len(group.seqs) == 4)

    prompt_blocks = -(-prompt_len // BLOCK_SIZE)
    stats = llm.get_memory_stats()
    assert stats["physical_blocks"] == prompt_blocks
    assert stats["logical_blocks"] == 4 * prompt_blocks
    # The shared prompt's tokens are stored once.
    assert stats["stored_tokens"] == prompt_len
    assert stats["slot_utilization"] == pytest.approx(prompt_len / (prompt_blocks * BLOCK_SIZE))
    assert copies == [[]]  # the prompt step copied nothing

    shared = llm.engine.block_manager.block_table(group.seqs[0].seq_id)[-1]
    llm.engine.step()  # every sample writes its first token
    assert len(copies[1]) == expected_copies
    assert all(src == shared for src, _ in copies[1])
    _step_until(llm, lambda: not llm.engine.has_unfinished_requests())
    assert sum(len(c) for c in copies) == expected_copies  # later writes go to private blocks
    _assert_clean(llm)


def test_seeded_samples_reproduce_and_differ(tiny_llama):
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=14, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(20, 45))}, {"prompt_token_ids": list(range(60, 86))}]

    def run(**options):
        llm = LLM(str(tiny_llama), block_size=BLOCK_SIZE, max_model_len=40, device="cpu",
                  dtype="float32", **options)
        outs = llm.generate(prompts, params, use_tqdm=False)
        _assert_clean(llm)
        return llm, [[c.token_ids for c in out.outputs] for out in outs]

    _, roomy = run(num_gpu_blocks=64)
    _, again = run(num_gpu_blocks=64)
    # 20 blocks, the least one request may need: two requests of four samples outgrow
    # them, and (auto mode) a request with several samples is swapped out and back.
    tight, swapped = run(num_gpu_blocks=20, swap_space=0.01)
    assert roomy == again == swapped
    assert all(len({tuple(t) for t in samples}) == 4 for samples in roomy), \
        "samples of one request must differ"
    assert tight.get_memory_stats()["num_swap_preemptions"] > 0


def test_best_of_returns_the_n_most_likely(tiny_llama):
    llm = LLM(str(tiny_llama), block_size=BLOCK_SIZE, max_model_len=64, device="cpu",
              num_gpu_blocks=64)
    params = SamplingParams(n=2, best_of=5, temperature=1.0, seed=5, max_tokens=6,
                            ignore_eos=True)
    every = SamplingParams(n=5, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True,
                           logprobs=0)  # to rank them
    prompt = {"prompt_token_ids": list(range(30, 40))}
    best = llm.generate(prompt, params, use_tqdm=False)[0].outputs
    candidates = llm.generate(prompt, every, use_tqdm=False)[0].outputs
    ranked = sorted(candidates, key=lambda c: c.cumulative_logprob, reverse=True)
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked[:2]]
    _assert_clean(llm)
