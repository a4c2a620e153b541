"""An fp8 KV cache (engine.kv_cache_dtype) through the engine: its pool size, and every
way blocks are shared or moved: prefix-cache hits, parallel samples and beams
(copy-on-write), preemption by swap or by recompute, async scheduling.

Quantizing changes the tokens of this random model, so runs are compared with an
fp8 run without preemption: a swapped block comes back byte for byte, and a
recomputed one is quantized from the same values, so the tokens must not change.
Every run ends with the pool all free and nothing swapped.
"""

from __future__ import annotations

import random

import pytest
import torch

from pagedserve import LLM, SamplingParams

ENGINE = dict(kv_cache_dtype="fp8", block_size=8, max_model_len=104, device="cpu",
              dtype="float32", max_num_batched_tokens=64)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _prompts() -> list[list[int]]:
    """A long shared prefix with several suffixes, an exact repeat, and one of its own."""
    rng = random.Random(7)
    system = [rng.randrange(6, 512) for _ in range(70)]
    suffixes = [[rng.randrange(6, 512) for _ in range(n)] for n in (1, 5, 9, 16)]
    other = [rng.randrange(6, 512) for _ in range(33)]
    return [system + s for s in suffixes] + [system + suffixes[1], other]


def _generate(llm: LLM, prompts, params) -> list[list[list[int]]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    stats = llm.get_memory_stats()
    assert stats["free_blocks"] == stats["total_blocks"], "blocks leaked"
    assert stats["swapped_blocks"] == stats["num_swapped"] == stats["num_running"] == 0
    assert all(o.finished for o in outputs)
    return [[c.token_ids for c in o.outputs] for o in outputs]


@pytest.fixture(scope="module")
def unpreempted(tiny_llama):
    """Greedy tokens with a pool that holds everything, and the prefix cache's hits."""
    llm = LLM(str(tiny_llama), num_gpu_blocks=138, **ENGINE)
    tokens = _generate(llm, _prompts(), GREEDY)
    assert llm.get_memory_stats()["prefix_cache_hit_rate"] > 0.2
    assert llm.engine.executor.worker.kv_pool.dtype == torch.float8_e4m3fn
    return tokens


# A pool of 13 blocks holds about one request: they preempt each other.
PREEMPTING = {
    "recompute": dict(preemption_mode="recompute"),
    "swap-async": dict(preemption_mode="swap", swap_space=0.01, async_scheduling=True),
}


@pytest.mark.parametrize("setting", list(PREEMPTING))
def test_preemption_keeps_the_greedy_tokens(tiny_llama, unpreempted, setting):
    llm = LLM(str(tiny_llama), num_gpu_blocks=13, **PREEMPTING[setting], **ENGINE)
    assert _generate(llm, _prompts(), GREEDY) == unpreempted
    stats = llm.get_memory_stats()
    assert stats["num_preemptions"] > 0
    assert (stats["num_swap_preemptions"] > 0) == setting.startswith("swap")


def test_samples_and_beams_keep_their_tokens_when_swapped(tiny_llama):
    """n=4 seeded samples and a beam search of width 4 (copy-on-write), in a pool they
    outgrow (auto mode swaps a group of several sequences) and in one they do not."""
    prompts = [list(range(20, 45)), list(range(60, 86))]
    samples = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=14, ignore_eos=True)
    beams = SamplingParams(n=2, best_of=4, use_beam_search=True, temperature=0.0,
                           max_tokens=10, ignore_eos=True)
    results = []
    for blocks in (64, 20):
        llm = LLM(str(tiny_llama), num_gpu_blocks=blocks, swap_space=0.01, **ENGINE)
        results.append((_generate(llm, prompts, samples), _generate(llm, prompts[:1], beams)))
        preempted = llm.get_memory_stats()["num_swap_preemptions"]
    roomy, tight = results
    assert roomy == tight
    assert preempted > 0
    assert all(len({tuple(t) for t in request}) == 4 for request in roomy[0])


def test_triton_kernels_keep_the_greedy_tokens_when_swapped(tiny_llama):
    """The Triton backend's writes, reads and block copies (in Triton's interpreter here):
    three short prompts that fit a pool of 8 blocks of 4 tokens, then outgrow it."""
    engine = {**ENGINE, "block_size": 4, "max_model_len": 32, "attention_backend": "triton",
              "preemption_mode": "swap", "swap_space": 0.01}
    prompts = [list(range(20, 25)), list(range(60, 66)), list(range(100, 105))]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    runs = []
    for blocks in (40, 8):
        llm = LLM(str(tiny_llama), num_gpu_blocks=blocks, **engine)
        runs.append(_generate(llm, prompts, params))
    assert runs[0] == runs[1]
    assert llm.get_memory_stats()["num_swap_preemptions"] > 0


@pytest.mark.parametrize("model_dtype,ratio", [("bfloat16", 2), ("float32", 4)])
def test_fp8_pool_holds_more_blocks(tiny_llama, model_dtype, ratio):
    """The same kv_cache_memory_gb holds 2x bfloat16's blocks (4x float32's), and the CPU
    swap pool of the same swap_space as many more."""
    stats = {}
    for kv_cache_dtype in ("auto", "fp8_e5m2"):
        llm = LLM(str(tiny_llama), device="cpu", dtype=model_dtype, kv_cache_memory_gb=0.01,
                  swap_space=0.005, kv_cache_dtype=kv_cache_dtype)
        stats[kv_cache_dtype] = llm.get_memory_stats()
    auto, fp8 = stats["auto"], stats["fp8_e5m2"]
    assert auto["block_bytes"] == ratio * fp8["block_bytes"]
    for key in ("total_blocks", "cpu_blocks"):
        assert ratio * auto[key] <= fp8[key] < ratio * (auto[key] + 1)
