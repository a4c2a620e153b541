"""A model whose every layer has a sliding window frees the blocks before it: requests
far longer than the window then fit side by side in a pool that holds one of them
at full length, with the same tokens as the engine that keeps every block (and, for
greedy requests, as transformers), through chunked prefill, prefix caching, parallel
sampling, swapping and scheduling a step ahead."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams
from pagedserve.testing import build_random_model

WINDOW = 16
MAX_LEN = 256
ENGINE = dict(block_size=4, max_model_len=MAX_LEN, dtype="float32", device="cpu",
              max_num_batched_tokens=48,  # prompts are computed in chunks
              num_gpu_blocks=MAX_LEN // 4,  # one request at full length, no more
              swap_space=0.05, enable_prefix_caching=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("window") / "mistral", arch="mistral",
                              sliding_window=WINDOW, num_key_value_heads=2)


def _workload():
    rng = random.Random(2)
    shared = [rng.randrange(6, 500) for _ in range(120)]  # a prefix four requests share
    prompts = [shared + [rng.randrange(6, 500) for _ in range(n)] for n in (30, 55, 70, 80)]
    greedy = SamplingParams(temperature=0.0, max_tokens=40)
    sampled = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=40, ignore_eos=True)
    # The sampled request is the shortest: its two sequences' worst case must fit the pool
    # (admission does not count on the window yet).
    return prompts, [sampled, greedy, greedy, greedy]


def _run(llm: LLM):
    prompts, params = _workload()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outputs], llm.get_memory_stats()


def test_windowed_requests_fit_side_by_side_with_the_same_tokens(model):
    freeing = LLM(str(model), **ENGINE)
    assert freeing.engine.scheduler.block_manager.sliding_window == WINDOW
    keeping = LLM(str(model), **ENGINE)
    keeping.engine.scheduler.block_manager.sliding_window = None  # keeps every block
    ours, stats = _run(freeing)
    theirs, kept_stats = _run(keeping)
    assert ours == theirs
    # Scheduling one step ahead (the step before still runs while blocks are freed).
    overlapped, async_stats = _run(LLM(str(model), async_scheduling=True, **ENGINE))
    assert overlapped == ours and async_stats["num_preemptions"] == 0
    # Keeping every block, the pool holds about one request: they preempt each other.
    # Freeing, each holds its window (about 16 / 4 + 2 blocks), and none is preempted.
    assert kept_stats["num_preemptions"] > 0 and stats["num_preemptions"] == 0
    assert stats["prefix_cache_hit_rate"] > 0.3
    for s in (stats, kept_stats):
        assert s["free_blocks"] == s["total_blocks"] and s["swapped_blocks"] == 0
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    prompts, _ = _workload()
    for prompt, tokens in zip(prompts[1:], ours[1:], strict=True):
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)
        assert tokens[0] == out[0, len(prompt):].tolist()


def test_a_model_with_full_layers_keeps_every_block(tmp_path):
    """Qwen2 with a window on layer 1 only: layer 0 reads the whole context."""
    path = build_random_model(tmp_path / "qwen2", arch="qwen2", use_sliding_window=True,
                              sliding_window=WINDOW, max_window_layers=1)
    llm = LLM(str(path), **ENGINE)
    assert llm.engine.scheduler.block_manager.sliding_window is None
