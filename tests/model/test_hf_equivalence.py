"""Greedy outputs and logprobs equal HF transformers' on the same saved weights.

HF runs one request at a time (no padding); pagedserve runs all of them at once
under three settings that exercise different paths: plain continuous batching,
chunked prefill (token budget below the longest prompt), and a pool so small
that requests are preempted and recomputed.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams

PROMPT_LENS = [1, 2, 3, 5, 8, 13, 16, 17, 31, 32, 33, 64, 100, 127, 200, 300]
MAX_TOKENS = 24
MAX_MODEL_LEN = 336  # the longest prompt plus its outputs, rounded up to a block
MODELS = ["llama", "llama-gqa", "mistral", "qwen2", "llama3-rope"]
# Later architectures, at one block size: the paging is the same as above.
ARCHITECTURES = ["mistral-window", "qwen2-window", "qwen3", "gemma3", "mixtral", "qwen3-moe"]
SETTINGS = {
    "plain": dict(max_num_batched_tokens=2048, num_gpu_blocks=512),
    "chunked-prefill": dict(max_num_batched_tokens=48, num_gpu_blocks=512),
    # Just one max-length sequence fits: requests preempt each other and recompute.
    "preempt-recompute": dict(max_num_batched_tokens=256, num_gpu_blocks=None),
}


def _prompts(vocab_size: int) -> list[list[int]]:
    rng = random.Random(1234)
    return [[rng.randrange(6, vocab_size) for _ in range(n)] for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def hf_reference(model_dirs):
    """name -> [(token_ids, top-1 logprobs)] per prompt, from HF generate, one request at a time."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = AutoModelForCausalLM.from_pretrained(model_dirs(name), dtype=torch.float32)
            model.eval()
            results = []
            for prompt in _prompts(model.config.vocab_size):
                with torch.inference_mode():
                    out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS,
                                         do_sample=False, output_scores=True,
                                         return_dict_in_generate=True)
                tokens = out.sequences[0, len(prompt):].tolist()
                logprobs = [torch.log_softmax(score[0].float(), -1)[t].item()
                            for score, t in zip(out.scores, tokens, strict=True)]
                results.append((tokens, logprobs))
            cache[name] = results
        return cache[name]

    return get


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize(("name", "block_size"), [(name, block_size) for name in MODELS
                                                  for block_size in (8, 16)]
                         + [(name, 16) for name in ARCHITECTURES])
def test_greedy_matches_hf(model_dirs, hf_reference, name, setting, block_size):
    options = dict(SETTINGS[setting])
    if options["num_gpu_blocks"] is None:
        options["num_gpu_blocks"] = MAX_MODEL_LEN // block_size
    llm = LLM(str(model_dirs(name)), block_size=block_size, max_model_len=MAX_MODEL_LEN,
              dtype="float32", device="cpu", **options)
    expected = hf_reference(name)
    prompts = _prompts(llm.engine.info.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    for prompt, output, (hf_tokens, hf_logprobs) in zip(prompts, outputs, expected, strict=True):
        completion = output.outputs[0]
        assert completion.token_ids == hf_tokens, f"prompt of {len(prompt)} tokens"
        ours = [entry[token]
                for entry, token in zip(completion.logprobs, completion.token_ids, strict=True)]
        assert ours == pytest.approx(hf_logprobs, abs=1e-3)
    stats = llm.get_memory_stats()
    assert stats["allocated_blocks"] == 0 and stats["num_running"] == stats["num_waiting"] == 0
    if setting == "preempt-recompute":
        assert stats["num_preemptions"] > 0
