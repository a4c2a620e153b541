"""The CPU attention kernel (a C++ extension reading blocks in place) against dense attention.

As for the Triton kernels: every slot outside the batch's contexts holds NaN,
and so does the output before the call, so a slot read that should not be, or
an element left unwritten, fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
from support.paged_batch import make_paged_batch, poison_before_windows

from pagedserve import LLM, SamplingParams
from pagedserve.kernels import cpu_kernels
from pagedserve.kernels.reference import paged_attention as reference_attention
from pagedserve.kernels.reference import write_kv_cache as reference_write_kv_cache
from pagedserve.worker.layers.attention import (
    AttentionMetadata,
    CPUAttentionBackend,
    TorchAttentionBackend,
    select_attention_backend,
)

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
             torch.float16: dict(atol=3e-3, rtol=3e-3)}
DECODES = [(n, 1) for n in (1, 9, 31, 64, 100, 257)]
# Whole prompts, chunks over a computed prefix (some longer than one query tile of 16),
# single-token chunks.
PREFILLS = [(7, 7), (40, 13), (70, 70), (31, 2), (5, 1), (100, 33), (90, 17)]


def run(batch, **kw):
    out = torch.full_like(batch.query, float("nan"))
    result = cpu_kernels.paged_attention(batch.query, batch.key_cache, batch.value_cache,
                                         batch.block_tables, batch.seq_lens,
                                         batch.query_start_loc, batch.scale, out=out, **kw)
    assert result is out
    return out


def check(out, batch, dtype):
    assert not out.isnan().any(), "an output element was not written, or NaN was read"
    torch.testing.assert_close(out.double(), batch.expected(), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("head_dim", [64, 128, 80])
@pytest.mark.parametrize("block_size", [1, 16, 32, 13])
def test_decodes_and_prefills_in_one_batch(block_size, head_dim, num_heads, num_kv_heads, dtype):
    batch = make_paged_batch(DECODES + PREFILLS, block_size=block_size, num_heads=num_heads,
                             num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
                             poison_unused=True, seed=block_size + head_dim + num_kv_heads)
    check(run(batch), batch, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [1, 5, 16, 33, 64])
def test_a_sliding_window_reads_the_last_positions_only(window, dtype):
    """Every position before a tile's first window is NaN-poisoned too: the kernel must
    not read it (nor the blocks before it)."""
    batch = make_paged_batch(DECODES + PREFILLS, block_size=8, num_heads=8, num_kv_heads=2,
                             head_dim=64, dtype=dtype, poison_unused=True, seed=window)
    poison_before_windows(batch, DECODES + PREFILLS, window)
    out = run(batch, window=window)
    assert not out.isnan().any(), "an output element was not written, or NaN was read"
    torch.testing.assert_close(out.double(), batch.expected(window), **TOLERANCE[dtype])


def test_equals_the_torch_reference_closely():
    batch = make_paged_batch(DECODES + PREFILLS, block_size=16, num_heads=8, num_kv_heads=2,
                             head_dim=64, seed=3)
    ours = run(batch)
    theirs = reference_attention(batch.query, batch.key_cache, batch.value_cache,
                                 batch.block_tables, batch.seq_lens, batch.query_start_loc,
                                 batch.scale)
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=2e-6)


def test_threads_split_the_work_the_same_way():
    batch = make_paged_batch(DECODES + PREFILLS, block_size=16, num_heads=8, num_kv_heads=2,
                             head_dim=64, seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(batch)
        torch.set_num_threads(2)
        two = run(batch)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_splits_a_step_between_kernel_and_matmuls(dtype):
    """The engine's path: this step's K/V written, then short rows through the kernel and
    chunks of MATMUL_FROM rows or more through the torch matmuls, into one output."""
    seqs = DECODES + PREFILLS
    batch = make_paged_batch(seqs, block_size=16, num_heads=8, num_kv_heads=2, head_dim=64,
                             dtype=dtype, poison_unused=True, seed=7)
    rows = batch.slot_mapping
    flat_k, flat_v = (cache.view(-1, 2, 64) for cache in (batch.key_cache, batch.value_cache))
    k_new, v_new = flat_k[rows].clone(), flat_v[rows].clone()
    flat_k[rows], flat_v[rows] = float("nan"), float("nan")
    backend = CPUAttentionBackend(2)
    query_lens = [q for _, q in seqs]
    plan = backend.plan(batch.block_tables, [s for s, _ in seqs], query_lens, len(DECODES), 16)
    short = [i for i, q in enumerate(query_lens) if q < backend.MATMUL_FROM]
    assert plan.kernel_seqs.tolist() == short
    assert len(plan.matmul.prefill) == len(seqs) - len(short) > 0
    metadata = AttentionMetadata(
        slot_mapping=batch.slot_mapping, query_start_loc=batch.query_start_loc,
        seq_lens=batch.seq_lens, block_tables=batch.block_tables, num_decodes=len(DECODES),
        max_query_len=max(query_lens), max_seq_len=max(s for s, _ in seqs), backend=backend,
        plan=plan)
    out = backend.forward(batch.query, k_new, v_new, (batch.key_cache, batch.value_cache),
                          metadata, batch.scale)
    check(out, batch, dtype)


def test_refuses_bad_inputs_naming_them():
    batch = make_paged_batch([(9, 1)], block_size=8, num_heads=4, num_kv_heads=2, head_dim=16)
    args = (batch.key_cache, batch.value_cache, batch.block_tables, batch.seq_lens,
            batch.query_start_loc, batch.scale)
    with pytest.raises(RuntimeError, match="must be int32"):
        cpu_kernels.paged_attention(batch.query, batch.key_cache, batch.value_cache,
                                    batch.block_tables.long(), batch.seq_lens,
                                    batch.query_start_loc, batch.scale)
    with pytest.raises(RuntimeError, match="head_dim"):
        cpu_kernels.paged_attention(batch.query[..., :8], *args)
    with pytest.raises(RuntimeError, match="share a dtype"):
        cpu_kernels.paged_attention(batch.query.double(), *args)
    too_long = batch.seq_lens + 100
    with pytest.raises(RuntimeError, match="needs more blocks than block_tables"):
        cpu_kernels.paged_attention(batch.query, batch.key_cache, batch.value_cache,
                                    batch.block_tables, too_long, batch.query_start_loc,
                                    batch.scale)


def test_auto_selects_it_on_cpu_and_falls_back_without_a_compiler(monkeypatch):
    assert isinstance(select_attention_backend("auto", torch.device("cpu"), 2),
                      CPUAttentionBackend)

    def missing():
        raise cpu_kernels.CPUKernelsUnavailable("no compiler")

    monkeypatch.setattr(cpu_kernels, "extension", missing)
    assert isinstance(select_attention_backend("auto", torch.device("cpu"), 2),
                      TorchAttentionBackend)
    with pytest.raises(cpu_kernels.CPUKernelsUnavailable, match="no compiler"):
        select_attention_backend("cpu", torch.device("cpu"), 2)
    with pytest.raises(ValueError, match="attention_backend='cpu' runs on the CPU"):
        select_attention_backend("cpu", torch.device("cuda"), 2)


def test_missing_compiler_is_a_clear_error(monkeypatch):
    cpu_kernels.extension.cache_clear()
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    try:
        with pytest.raises(cpu_kernels.CPUKernelsUnavailable,
                           match="needs a C\\+\\+ compiler.*'no-such-compiler-here'"):
            cpu_kernels.extension()
    finally:
        cpu_kernels.extension.cache_clear()


@pytest.mark.parametrize("engine", [
    dict(max_num_batched_tokens=24, max_model_len=128, num_gpu_blocks=64),  # chunked prefill
    dict(max_model_len=96, num_gpu_blocks=12),  # preempted and recomputed
])
def test_engine_gives_the_torch_backends_answers(model_dirs, engine):
    prompts = [{"prompt_token_ids": list(range(7, 7 + n))} for n in (45, 1, 19, 80, 6)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=1)
    outputs = {}
    for backend in ("torch", "cpu"):
        llm = LLM(str(model_dirs("llama-gqa")), attention_backend=backend, device="cpu",
                  dtype="float32", block_size=8, **engine)
        assert llm.engine.executor.worker.attention.name == backend
        outputs[backend] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.get_memory_stats()["free_blocks"] == engine["num_gpu_blocks"]
    for ours, theirs in zip(outputs["cpu"], outputs["torch"], strict=True):
        assert ours.token_ids == theirs.token_ids
        assert ours.cumulative_logprob == pytest.approx(theirs.cumulative_logprob, abs=1e-3)


def test_argmax_rows_is_torch_argmax_ties_and_nan_included():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 1000, generator=gen)
    logits[1, [5, 700]] = 50.0  # a tie: the first index wins
    logits[2] = float("-inf")
    logits[3, [10, 400]] = float("nan")  # torch.argmax takes the first NaN
    logits[4, 999] = 60.0  # the last column
    assert torch.equal(cpu_kernels.argmax_rows(logits), logits.argmax(dim=-1))
    assert cpu_kernels.argmax_rows(logits[:0]).shape == (0,)
    with pytest.raises(RuntimeError, match="contiguous \\[rows, vocab\\] float32"):
        cpu_kernels.argmax_rows(logits.double())


def test_rotary_in_place_equals_the_torch_rotation():
    """q and k as the model has them: views of one fused QKV output, with row strides."""
    from transformers import LlamaConfig

    from pagedserve.worker.layers.rotary import RotaryEmbedding, _rotate

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    rotary = RotaryEmbedding(config, 16, 128)
    positions = torch.tensor([0, 5, 127, 3, 3])
    qkv = torch.randn(5, (4 + 2 + 2) * 16)
    q, k = qkv[:, :64].view(5, 4, 16), qkv[:, 64:96].view(5, 2, 16)
    cos, sin = rotary.cos[positions].unsqueeze(1), rotary.sin[positions].unsqueeze(1)
    want_q, want_k, v = _rotate(q, cos, sin), _rotate(k, cos, sin), qkv[:, 96:].clone()
    rope = rotary.lookup(positions)
    assert rope.table is rotary  # the kernel's path on the CPU in float32
    got_q, got_k = RotaryEmbedding.apply(rope, q, k)
    assert got_q.data_ptr() == q.data_ptr()  # in place
    torch.testing.assert_close(got_q, want_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_k, want_k, atol=1e-6, rtol=1e-6)
    assert torch.equal(qkv[:, 96:], v)  # v untouched
    with pytest.raises(RuntimeError, match="outside the rotary table"):
        cpu_kernels.rotary_(q, k, rotary.cos, rotary.sin, torch.tensor([0, 1, 2, 3, 128]))


def test_rms_norm_with_and_without_the_residual_add():
    from pagedserve.worker.layers.norm import RMSNorm

    gen = torch.Generator().manual_seed(1)
    x, residual = torch.randn(7, 48, generator=gen), torch.randn(7, 48, generator=gen)
    norm = RMSNorm(48, 1e-6)
    norm.weight.data = torch.randn(48, generator=gen)
    torch.testing.assert_close(cpu_kernels.rms_norm(x, norm.weight, 1e-6), norm._norm(x),
                               atol=1e-6, rtol=1e-5)
    total = residual + x
    normed, stream = norm(x, residual.clone())
    torch.testing.assert_close(stream, total, atol=0, rtol=0)
    torch.testing.assert_close(normed, norm._norm(total), atol=1e-6, rtol=1e-5)
    in_place = residual.clone()
    cpu_kernels.rms_norm(x, norm.weight, 1e-6, in_place)
    assert torch.equal(in_place, total)  # the residual stream is updated where it lies
    with pytest.raises(RuntimeError, match="residual must be a contiguous float32 like x"):
        cpu_kernels.rms_norm(x, norm.weight, 1e-6, residual[:3])


def test_silu_and_mul_is_silu_of_the_gate_times_up():
    gen = torch.Generator().manual_seed(2)
    gate_up = torch.randn(9, 2 * 3000, generator=gen) * 4  # rows span the threads' chunks
    gate, up = gate_up.split(3000, dim=-1)
    torch.testing.assert_close(cpu_kernels.silu_and_mul(gate_up),
                               torch.nn.functional.silu(gate) * up, atol=1e-6, rtol=1e-5)
    assert cpu_kernels.silu_and_mul(torch.empty(0, 8)).shape == (0, 4)
    with pytest.raises(RuntimeError, match=r"x must be a contiguous \[T, 2 I\] float32"):
        cpu_kernels.silu_and_mul(gate_up.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache_equals_the_reference_padding_rows_skipped(dtype):
    """Rows of a fused q/k/v output (strided, as the model's split gives them), one
    padding slot (-1), into a cache of their dtype."""
    gen = torch.Generator().manual_seed(0)
    num_tokens, heads, dim = 7, 2, 8
    qkv = torch.randn(num_tokens, 3 * heads * dim, generator=gen).to(dtype)
    key = qkv[:, heads * dim:2 * heads * dim].view(num_tokens, heads, dim)
    value = qkv[:, 2 * heads * dim:].view(num_tokens, heads, dim)
    slots = torch.tensor([5, 0, -1, 17, 8, 31, 2])
    caches = [torch.zeros(4, 8, heads, dim, dtype=dtype) for _ in range(4)]
    cpu_kernels.write_kv_cache(key, value, caches[0], caches[1], slots)
    reference_write_kv_cache(key, value, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert caches[0].abs().sum() > 0
    with pytest.raises(RuntimeError, match="slot 32 is past the cache's 32 slots"):
        cpu_kernels.write_kv_cache(key, value, caches[0], caches[1], slots.clamp(max=32) + 1)
    with pytest.raises(RuntimeError, match="must have the caches' dtype"):
        cpu_kernels.write_kv_cache(key.double(), value.double(), caches[0], caches[1], slots)
