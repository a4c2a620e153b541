"""Decode graphs: the ladder of sizes, and padded static-buffer decode steps.

There is no CUDA here, so `DecodeGraphs(replay=False)` runs the exact inputs a
captured graph would replay (static buffers, the batch padded to a captured
size, the length-independent plan) eagerly through the interpreted Triton
kernels. A GPU run of benchmarks/gpu_e2e.py covers the capture and replay.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.kernels.checks import interpreting
from pagedserve.worker.cuda_graph import DecodeGraphs, capture_sizes
from pagedserve.worker.layers.attention import CPUAttentionBackend, TorchAttentionBackend

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not interpreting() else "cpu")


@pytest.mark.parametrize("max_num_seqs,expected", [
    (1, [1]),
    (3, [1, 2, 3]),
    (8, [1, 2, 4, 8]),
    (20, [1, 2, 4, 8, 16, 20]),
    (64, [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]),
    (100, [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 100]),
])
def test_capture_sizes(max_num_seqs, expected):
    assert capture_sizes(max_num_seqs) == expected


def test_capture_sizes_default_ladder():
    sizes = capture_sizes(256)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 256
    steps = {b - a for a, b in pairwise(sizes[4:])}
    assert steps == {8, 16} and len(sizes) == 4 + 7 + 12


@pytest.mark.parametrize("backend,kind", [("torch", TorchAttentionBackend),
                                          ("auto", CPUAttentionBackend)])
def test_graphs_need_a_length_independent_backend(tiny_llama, backend, kind):
    llm = LLM(str(tiny_llama), device="cpu", dtype="float32", max_model_len=64, num_gpu_blocks=8,
              attention_backend=backend)
    worker = llm.engine.executor.worker
    assert isinstance(worker.attention, kind)
    with pytest.raises(ValueError, match="decode graphs need the 'triton' backend"):
        DecodeGraphs(worker.model, worker.attention, worker.kv_caches, block_size=16,
                     max_model_len=64, max_num_seqs=8, device=torch.device("cpu"))


# Five prompts of different lengths ending at different steps: decode batches of
# 5, 4, 3 and 2 sequences, padded to the captured sizes 8 and 4.
PROMPTS = [{"prompt_token_ids": list(range(5 + i, 5 + i + n))} for i, n in
           enumerate((3, 17, 9, 30, 12))]
MAX_TOKENS = [12, 5, 9, 12, 7]


def _generate(llm):
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=2)
              for n in MAX_TOKENS]
    return [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_padded_static_decode_equals_eager(model_dirs):
    # Eager first (no captured graphs on a GPU either), then the same steps padded.
    llm = LLM(str(model_dirs("llama-gqa")), attention_backend="triton", device=DEVICE.type,
              dtype="float32", block_size=8, max_model_len=64, num_gpu_blocks=48, max_num_seqs=6,
              enable_prefix_caching=False,  # both runs take the same blocks, block 0 first
              enforce_eager=True)
    worker = llm.engine.executor.worker
    eager = _generate(llm)

    graphs = DecodeGraphs(worker.model, worker.attention, worker.kv_caches, block_size=8,
                          max_model_len=64, max_num_seqs=6, device=DEVICE,
                          replay=False)
    assert graphs.sizes == [1, 2, 4, 6]
    loaded = []  # (decode sequences, padded size) of each step run through the graphs
    load = graphs.load

    def spy(seqs):
        size, logits_rows = load(seqs)
        loaded.append((len(seqs), size))
        return size, logits_rows

    graphs.load = spy
    worker.runner.graphs = graphs
    got = _generate(llm)

    assert [c.token_ids for c in got] == [c.token_ids for c in eager]
    for ours, theirs in zip(got, eager, strict=True):
        for a, b in zip(ours.logprobs, theirs.logprobs, strict=True):
            assert a.keys() == b.keys()
            assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-4)
    assert (5, 6) in loaded and (3, 4) in loaded  # padded batches ran
    assert all(size == graphs.padded_size(n) >= n for n, size in loaded)
    # Every decode step went through the graphs: all tokens after each prompt's first.
    assert sum(n for n, _ in loaded) == sum(MAX_TOKENS) - len(MAX_TOKENS)
    stats = llm.get_memory_stats()
    assert stats["free_blocks"] == stats["total_blocks"]


@pytest.mark.skipif(not torch.cuda.is_available() or interpreting(),
                    reason="capture and replay need a GPU and compiled kernels "
                           "(TRITON_INTERPRET=0)")
def test_captured_graphs_replay_the_eager_tokens(model_dirs):
    engine = dict(device="cuda", dtype="float32", block_size=8, max_model_len=64,
                  num_gpu_blocks=48, max_num_seqs=6, enable_prefix_caching=False)
    llm = LLM(str(model_dirs("llama-gqa")), **engine)
    graphs = llm.engine.executor.worker.runner.graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 6] and graphs.capture_s > 0
    got = _generate(llm)
    eager_llm = LLM(str(model_dirs("llama-gqa")), enforce_eager=True, **engine)
    assert eager_llm.engine.executor.worker.runner.graphs is None
    expected = _generate(eager_llm)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    for ours, theirs in zip(got, expected, strict=True):
        for a, b in zip(ours.logprobs, theirs.logprobs, strict=True):
            assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-3)
