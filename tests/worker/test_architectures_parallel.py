"""The later architectures over two Ray ranks (gloo on CPU): Qwen3, Gemma 3 and a
Mistral with a window on every layer (its blocks before the window freed) under
tensor parallelism, and the mixture-of-experts models (Mixtral, Qwen3-MoE) under tensor
and expert parallelism, give HF's greedy tokens and the single rank's sampled ones,
through chunked prefill, prefix caching and preemption; and the splits that cannot
be made are refused before a rank starts."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams
from pagedserve.config import parse
from pagedserve.model.rules import check_tensor_parallel
from pagedserve.model.shape import ModelShape, load_presets
from pagedserve.testing import build_random_model

MAX_TOKENS = 10
VOCAB = 300
MODELS = {
    "qwen3": dict(arch="qwen3", num_key_value_heads=2),
    "gemma3": dict(arch="gemma3"),  # sliding layers (window 24) and a global one
    # Every layer over 24 positions: the blocks before the window are freed.
    "mistral-window": dict(arch="mistral", num_key_value_heads=2, sliding_window=24),
    # 4 experts of 96 features, top 2: each rank holds 48 features of each, or 2 whole.
    "mixtral": dict(arch="mixtral", num_key_value_heads=2, intermediate_size=96),
    # 8 experts, top 2 unnormalized; layer 1 of 3 dense.
    "qwen3-moe": dict(arch="qwen3_moe", num_key_value_heads=2, num_hidden_layers=3,
                      mlp_only_layers=[1], norm_topk_prob=False),
}
ENGINE = dict(block_size=8, max_model_len=96, dtype="float32", device="cpu",
              max_num_batched_tokens=24,  # below the longest prompt: chunked prefill
              num_gpu_blocks=13, swap_space=0.01)  # about one request fits: preemption


def _prompts() -> list[list[int]]:
    rng = random.Random(5)
    system = [rng.randrange(6, VOCAB) for _ in range(40)]
    return ([system + [rng.randrange(6, VOCAB) for _ in range(n)] for n in (2, 11, 25)]
            + [[rng.randrange(6, VOCAB) for _ in range(30)], system[:9]])


NUM_GREEDY = 4  # the last prompt samples n=2 with a seed


def _params() -> list[SamplingParams]:
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    sampled = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=MAX_TOKENS,
                             ignore_eos=True)
    return [greedy] * NUM_GREEDY + [sampled]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-parallel")
    built: dict[str, object] = {}

    def get(name: str):
        if name not in built:
            built[name] = build_random_model(root / name, vocab_size=VOCAB, **MODELS[name])
        return built[name]

    return get


def _run(llm: LLM) -> tuple[list[list[list[int]]], dict]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], _params(),
                           use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outputs], llm.get_memory_stats()


def _hf_greedy(model_dir) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    results = []
    for prompt in _prompts()[:NUM_GREEDY]:
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS,
                                 do_sample=False)
        results.append(out[0, len(prompt):].tolist())
    return results


CASES = {"qwen3-tp2": ("qwen3", False), "gemma3-tp2": ("gemma3", False),
         "mistral-window-tp2": ("mistral-window", False),
         "mixtral-tp2": ("mixtral", False), "mixtral-ep2": ("mixtral", True),
         "qwen3-moe-tp2": ("qwen3-moe", False), "qwen3-moe-ep2": ("qwen3-moe", True)}


@pytest.mark.parametrize("name, expert_parallel", list(CASES.values()), ids=list(CASES))
def test_two_ranks_equal_one_and_hf(ray_cluster, models, name, expert_parallel):
    model_dir = models(name)
    one, one_stats = _run(LLM(str(model_dir), **ENGINE))
    assert one_stats["num_preemptions"] > 0 and one_stats["prefix_cache_hit_rate"] > 0
    llm = LLM(config=parse({
        "model": {"path": str(model_dir), "dtype": "float32",
                  "max_model_len": ENGINE["max_model_len"]},
        "engine": {k: v for k, v in ENGINE.items() if k not in ("max_model_len", "dtype")},
        "parallel": {"tensor_parallel_size": 2, "distributed_executor_backend": "ray",
                     "worker_cpus": 0.25, "enable_expert_parallel": expert_parallel}}))
    try:
        two, stats = _run(llm)
    finally:
        llm.shutdown()
    assert two == one
    assert [o[0] for o in two[:NUM_GREEDY]] == _hf_greedy(model_dir)
    assert stats["num_preemptions"] > 0 and stats["free_blocks"] == stats["total_blocks"]


def test_splits_that_cannot_be_made_are_refused_before_a_rank_starts(models):
    with pytest.raises(ValueError, match="enable_expert_parallel is for a mixture-of-experts "
                                         "model"):
        LLM(str(models("qwen3")), tensor_parallel_size=2, enable_expert_parallel=True, **ENGINE)
    # Three experts of 90 features: two ranks split the features, not the experts.
    shape = ModelShape.from_hf_config(
        {**load_presets()["mixtral-8x7b"], "num_local_experts": 3, "intermediate_size": 90},
        "a Mixtral of 3 experts")
    check_tensor_parallel(shape, 2)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 does not divide the model's "
                                         "num_experts=3"):
        check_tensor_parallel(shape, 2, expert_parallel=True)
    with pytest.raises(ValueError, match="tensor_parallel_size=4 does not divide the model's "
                                         "experts' intermediate_size=90"):
        check_tensor_parallel(shape, 4)
