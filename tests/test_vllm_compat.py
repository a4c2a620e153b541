"""vLLM users' snippets run: its engine statistics surface and its spellings."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from pagedserve import LLM, AsyncEngineArgs, AsyncLLMEngine, SamplingParams
from pagedserve.config import config_from_fields
from pagedserve.engine.executors import choose_dtype
from pagedserve.errors import RequestError
from pagedserve.kernels import cpu_gemm

MAX_MODEL_LEN = 48


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), block_size=8, max_model_len=MAX_MODEL_LEN, num_gpu_blocks=24,
               max_num_seqs=2, device="cpu", dtype="float32")


def _greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, ignore_eos=True, **kwargs)


# -- the engine statistics surface -----------------------------------------------------------

def test_block_and_queue_counts_agree_with_memory_stats_at_every_step(llm):
    engine = llm.llm_engine
    assert engine is llm.engine
    scheduler = engine.scheduler
    block_manager = scheduler.block_manager
    shared = list(range(20, 40))  # two full blocks: cached once the first request ends
    prompts = [shared + [5], shared + [6], list(range(50, 61)), shared + [7], [9, 10, 11]]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"stats-{i}", prompt, _greedy(max_tokens=4 + i))
    seen_waiting, seen_cached, steps = set(), 0, 0

    def check():
        stats = llm.get_memory_stats()
        total, allocated = block_manager.num_total_blocks, block_manager.num_allocated_blocks
        free = block_manager.num_free_blocks
        assert total == allocated + free
        assert (total, allocated, free) == (stats["total_blocks"], stats["allocated_blocks"],
                                            stats["free_blocks"])
        assert scheduler.waiting_queue_size == stats["num_waiting"]
        seen_waiting.add(scheduler.waiting_queue_size)
        return stats["cached_blocks"]

    check()
    assert scheduler.waiting_queue_size == len(prompts)  # all queued, none admitted yet
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        seen_cached = max(seen_cached, check())
    assert steps > 5 and {0, len(prompts) - 2} <= seen_waiting  # max_num_seqs=2 held 3 back
    assert seen_cached > 0  # cached prefix blocks, reclaimable, counted as free
    assert block_manager.num_free_blocks == block_manager.num_total_blocks


# -- vLLM's spellings ------------------------------------------------------------------------

def test_top_k_minus_one_is_off_as_zero(llm):
    assert SamplingParams(top_k=-1).top_k == 0
    prompt = [{"prompt_token_ids": [3, 4, 5, 6]}]
    runs = [llm.generate(prompt, SamplingParams(top_k=top_k, seed=7, max_tokens=8,
                                                ignore_eos=True), use_tqdm=False)
            for top_k in (-1, 0)]
    assert runs[0][0].outputs[0].token_ids == runs[1][0].outputs[0].token_ids
    with pytest.raises(RequestError, match=r"SamplingParams\.top_k=-3") as info:
        SamplingParams(top_k=-3)
    assert info.value.param == "top_k"


@pytest.mark.parametrize("prompt_len", [10, MAX_MODEL_LEN - 1, MAX_MODEL_LEN])
def test_max_tokens_none_runs_to_the_context_limit(llm, prompt_len):
    prompt = [(7 * i) % 500 + 3 for i in range(prompt_len)]
    [output] = llm.generate([{"prompt_token_ids": prompt}], _greedy(max_tokens=None),
                            use_tqdm=False)
    completion = output.outputs[0]
    # As the HTTP API's null: max_model_len less the prompt, at least one token.
    assert len(completion.token_ids) == max(MAX_MODEL_LEN - prompt_len, 1)
    assert completion.finish_reason == "length"


@pytest.mark.parametrize("alias, dtype", [("half", "float16"), ("float", "float32"),
                                          ("float16", "float16"), ("float32", "float32"),
                                          ("bfloat16", "bfloat16")])
def test_dtype_spellings(alias, dtype):
    assert config_from_fields("m", {"dtype": alias}, "LLM arguments").model.dtype == dtype


@pytest.mark.parametrize("native", [True, False])
def test_float16_on_cpu_follows_the_cpu(monkeypatch, caplog, native):
    monkeypatch.setattr(cpu_gemm, "float16_supported", lambda: native)
    with caplog.at_level(logging.WARNING, logger="pagedserve"):
        got = choose_dtype(torch.float16, torch.device("cpu"))
    assert got == (torch.float16 if native else torch.bfloat16)
    assert any("bfloat16" in r.getMessage() for r in caplog.records) == (not native)
    weight = torch.zeros(4, 4, dtype=torch.float16)
    assert cpu_gemm.can_pack(weight) == (native and cpu_gemm.available())
    # Other dtypes and devices are as asked.
    assert choose_dtype(torch.float16, torch.device("cuda")) == torch.float16
    assert choose_dtype(torch.float32, torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("cpu", ["this", "without-native-float16"])
def test_float16_generates_on_this_machine(tiny_llama, monkeypatch, cpu):
    """float16 where the CPU has native float16 matmuls, bfloat16 where not: it runs."""
    if cpu != "this":  # as on an AMD EPYC, where oneDNN's float16 packing raised
        monkeypatch.setattr(cpu_gemm, "float16_supported", lambda: False)
    llm = LLM(str(tiny_llama), block_size=8, max_model_len=32, num_gpu_blocks=16, device="cpu",
              dtype="float16")
    expected = torch.float16 if cpu_gemm.float16_supported() else torch.bfloat16
    assert llm.engine.info.dtype == expected
    [output] = llm.generate([{"prompt_token_ids": [3, 4, 5]}], _greedy(max_tokens=6),
                            use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 6
    llm.shutdown()


def test_chunked_prefill_is_always_on(tiny_llama):
    config = config_from_fields(str(tiny_llama), {"enable_chunked_prefill": True}, "LLM")
    assert config.engine.enable_chunked_prefill
    assert AsyncEngineArgs(model="m", enable_chunked_prefill=True).config.engine
    for build in (lambda: LLM(str(tiny_llama), enable_chunked_prefill=False),
                  lambda: AsyncEngineArgs(model="m", enable_chunked_prefill=False)):
        with pytest.raises(ValueError, match="enable_chunked_prefill") as info:
            build()
        assert "always on" in str(info.value) and "max_num_batched_tokens" in str(info.value)


def test_request_id_must_be_a_str(tiny_llama):
    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(
        model=str(tiny_llama), max_model_len=32, device="cpu", num_gpu_blocks=16, block_size=8))
    try:
        async def first(request_id):
            params = _greedy(max_tokens=2)
            return [out async for out in engine.generate({"prompt_token_ids": [3, 4]}, params,
                                                         request_id)]

        with pytest.raises(TypeError, match=r"request_id must be a str[\s\S]*got int 1"):
            asyncio.run(first(1))
        assert asyncio.run(first("1"))[-1].finished  # the engine still serves
    finally:
        engine.shutdown()
