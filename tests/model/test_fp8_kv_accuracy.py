"""What an fp8 KV cache costs the embedded default (SmolLM2-135M-Instruct, Q4_1 GGUF):
the mean negative log-likelihood of a fixed text, with the cache in float32 and in fp8.

The text (the first 1,000 tokens of pagedserve/data/corpus.txt) is scored by its
prompt logprobs, in chunks of 128 tokens (max_num_batched_tokens), so every chunk
after the first attends over K/V read back from the cache. On the CPU backend a
chunk's own K/V are also written before they are read, so every attention read
in the text goes through the quantized cache; the weights, the model dtype and
the chunking are the same in every run, so the difference is the cache's alone.

Bounds, on the relative increase of the NLL over the float cache's: 1% for fp8
(e4m3, 3 mantissa bits; measured 0.25%), 2.5% for fp8_e5m2 (2 mantissa bits,
twice e4m3's rounding error; measured 1.5%).
"""

from __future__ import annotations

from importlib import resources

import pytest
from conftest import user_cache

from pagedserve import LLM, SamplingParams

NUM_TOKENS = 1000
CHUNK = 128
BOUNDS = {"fp8": 0.01, "fp8_e5m2": 0.025}


def _nll(gguf, kv_cache_dtype: str) -> float:
    with user_cache():
        llm = LLM(str(gguf), device="cpu", dtype="float32", max_model_len=1024,
                  kv_cache_memory_gb=0.05, kv_cache_dtype=kv_cache_dtype,
                  max_num_batched_tokens=CHUNK, enable_prefix_caching=False)
    text = resources.files("pagedserve").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    ids = llm.get_tokenizer()(text).input_ids[:NUM_TOKENS]
    assert len(ids) == NUM_TOKENS
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    (output,) = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
    logprobs = [output.prompt_logprobs[i][ids[i]] for i in range(1, len(ids))]
    return -sum(logprobs) / len(logprobs)


@pytest.fixture(scope="module")
def float_nll(embedded_gguf) -> float:
    return _nll(embedded_gguf, "auto")


@pytest.mark.parametrize("kv_cache_dtype", list(BOUNDS))
def test_fp8_cache_nll_within_bound(embedded_gguf, float_nll, kv_cache_dtype):
    nll = _nll(embedded_gguf, kv_cache_dtype)
    increase = (nll - float_nll) / float_nll
    print(f"NLL float32 cache {float_nll:.5f}, {kv_cache_dtype} {nll:.5f} ({increase:+.2%})")
    assert abs(increase) < BOUNDS[kv_cache_dtype]
