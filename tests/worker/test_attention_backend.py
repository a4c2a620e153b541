"""Choosing the attention backend, and the engine giving the same answers with each."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.scheduler.step import StepInput
from pagedserve.worker.layers.attention import (
    CPUAttentionBackend,
    TorchAttentionBackend,
    TritonAttentionBackend,
    select_attention_backend,
)

# A one-token prompt admitted behind a long prompt's chunks: a q_len-1 sequence after a prefill.
PROMPTS = [{"prompt_token_ids": list(range(7, 7 + n))} for n in (45, 1, 19, 80, 6)]


@pytest.mark.parametrize("name,device,expected", [
    ("auto", "cpu", CPUAttentionBackend),
    ("auto", "cuda", TritonAttentionBackend),
    ("torch", "cuda", TorchAttentionBackend),
    ("triton", "cpu", TritonAttentionBackend),  # interpreted, as in these tests
])
def test_selection(name, device, expected):
    assert isinstance(select_attention_backend(name, torch.device(device), 2), expected)


def test_triton_on_cpu_without_interpreter_is_refused(tiny_llama, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="attention_backend='triton' needs a CUDA device"):
        LLM(str(tiny_llama), attention_backend="triton", device="cpu", num_gpu_blocks=64)


def _run(model_dir, backend, **engine):
    llm = LLM(str(model_dir), attention_backend=backend, device="cpu", dtype="float32",
              block_size=8, **engine)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=1)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return llm, [o.outputs[0] for o in outs]


@pytest.mark.parametrize("variant,engine", [
    # Chunked prefill: steps mix decode tokens with prompt chunks over computed prefixes.
    ("llama-gqa", dict(max_num_batched_tokens=24, max_model_len=128, num_gpu_blocks=64)),
    # A pool of one max-length sequence: requests are preempted and recomputed.
    ("llama", dict(max_model_len=96, num_gpu_blocks=12)),
])
def test_greedy_outputs_identical_between_backends(model_dirs, variant, engine, monkeypatch):
    model_dir = model_dirs(variant)
    torch_llm, expected = _run(model_dir, "torch", **engine)
    steps = []  # (decode sequences, all sequences) of each step the Triton backend ran
    forward = TritonAttentionBackend.forward

    def spy(self, q, k, v, kv_cache, metadata, scale, window=None, k_scale=1.0, v_scale=1.0):
        steps.append((metadata.num_decodes, metadata.seq_lens.shape[0]))
        return forward(self, q, k, v, kv_cache, metadata, scale, window, k_scale, v_scale)

    monkeypatch.setattr(TritonAttentionBackend, "forward", spy)
    triton_llm, got = _run(model_dir, "triton", **engine)

    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    for a, b in zip(got, expected, strict=True):
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-3)
    preempted = torch_llm.get_memory_stats()["num_preemptions"]
    assert triton_llm.get_memory_stats()["num_preemptions"] == preempted
    if engine.get("num_gpu_blocks") == 12:
        assert preempted > 0
    assert any(0 < decodes < seqs for decodes, seqs in steps), "no step mixed decodes and prefills"
    assert triton_llm.get_memory_stats()["free_blocks"] == engine["num_gpu_blocks"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_worker_copies_blocks_before_the_step(tiny_llama, backend):
    llm = LLM(str(tiny_llama), attention_backend=backend, device="cpu", max_model_len=64,
              num_gpu_blocks=16)
    worker = llm.engine.executor.worker
    worker.kv_pool.normal_()
    before = worker.kv_pool.clone()

    worker.execute(StepInput(seqs=[], blocks_to_copy=[(3, 9), (4, 10)]))

    assert torch.equal(worker.kv_pool[:, :, 9], before[:, :, 3])
    assert torch.equal(worker.kv_pool[:, :, 10], before[:, :, 4])
    assert torch.equal(worker.kv_pool[:, :, :9], before[:, :, :9])
    # The per-layer caches the model reads are views of that one pool.
    assert worker.kv_caches[1][0].data_ptr() == worker.kv_pool[1, 0].data_ptr()
