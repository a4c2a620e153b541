"""The mixture-of-experts paths against the one-token-at-a-time reference
(kernels/reference.py's `moe`): the Triton grouped GEMMs (kernels/fused_moe.py), the
C++ kernel (kernels/cpu_kernels.py's `fused_moe`), and each CPU path of
layers/moe.py, over expert counts, top-k and token mixes, with experts that get no
token and with experts held by other ranks."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels import cpu_kernels, quant_gemm, reference
from pagedserve.kernels.checks import interpreting
from pagedserve.kernels.fused_moe import align_tokens, fused_moe
from pagedserve.worker.distributed import TPGroup
from pagedserve.worker.layers.linear import pack_linear_weights
from pagedserve.worker.layers.moe import FusedMoE, route

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not interpreting() else "cpu")
# Neither a power of two: the Triton kernels' masks are used, and the C++ kernel's
# layout pads both (H to a multiple of 32, I to one of 16).
HIDDEN, INTER = 48, 40


def _case(num_experts: int, num_tokens: int, top_k: int, used: int, seed: int,
          dtype: torch.dtype = torch.float32):
    """Weights of num_experts experts; each token routed to top_k of the first `used`."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, HIDDEN, generator=gen)
    w13 = torch.randn(num_experts, 2 * INTER, HIDDEN, generator=gen) / HIDDEN ** 0.5
    w2 = torch.randn(num_experts, HIDDEN, INTER, generator=gen) / INTER ** 0.5
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    logits[:, used:] = -1e4  # the experts past `used` get no token
    weights, ids = route(logits, top_k, renormalize=True)
    return [t.to(DEVICE) for t in (hidden.to(dtype), w13.to(dtype), w2.to(dtype))] + [
        weights.to(DEVICE), ids.to(DEVICE)]


CASES = [  # experts, tokens, top_k, experts used
    (1, 5, 1, 1),
    (4, 1, 2, 4),  # one decode token
    (4, 33, 2, 2),  # two experts get every token, two get none
    (8, 70, 2, 8),  # more pairs than one block per expert
    (8, 17, 3, 5),
    (16, 9, 4, 16),  # more experts than pairs: most runs empty
]


@pytest.mark.parametrize("num_experts, num_tokens, top_k, used", CASES)
def test_fused_moe_equals_the_reference(num_experts, num_tokens, top_k, used):
    hidden, w13, w2, weights, ids = _case(num_experts, num_tokens, top_k, used, seed=num_tokens)
    expected = reference.moe(hidden, w13, w2, weights, ids)
    got = fused_moe(hidden, w13, w2, weights, ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_fused_moe_in_bfloat16_is_close_to_float32():
    hidden, w13, w2, weights, ids = _case(8, 40, 2, 8, seed=3, dtype=torch.bfloat16)
    expected = reference.moe(hidden.float(), w13.float(), w2.float(), weights, ids)
    got = fused_moe(hidden, w13, w2, weights, ids)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_a_rank_of_expert_parallelism_computes_its_experts_share(rank):
    """Rank r of 4 holds experts [2r, 2r + 2) of 8: its output is those experts'
    contributions, and the four ranks' outputs sum to the whole layer's."""
    hidden, w13, w2, weights, ids = _case(8, 23, 2, 8, seed=11)
    local = slice(2 * rank, 2 * rank + 2)
    expected = reference.moe(hidden, w13[local], w2[local], weights, ids, first_expert=2 * rank)
    got = fused_moe(hidden, w13[local].contiguous(), w2[local].contiguous(), weights, ids,
                    first_expert=2 * rank)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    total = sum(fused_moe(hidden, w13[2 * r:2 * r + 2].contiguous(),
                          w2[2 * r:2 * r + 2].contiguous(), weights, ids, first_expert=2 * r)
                for r in range(4))
    torch.testing.assert_close(total, reference.moe(hidden, w13, w2, weights, ids),
                               atol=1e-4, rtol=1e-4)


def _quantized(weight: torch.Tensor, fmt: str, group: int, asymmetric: bool, seed: int):
    """Random experts of a float stack's shape [E, N, K], quantized, packed and stacked for
    fused_moe; scales make weights of about K^-1/2, as _case's are."""
    gen = torch.Generator().manual_seed(seed)
    num_experts, n, k = weight.shape
    typical_code = {"int4": 8, "int8": 64, "fp8_e4m3": 100}[fmt]
    scales = (torch.rand(n, k // group, generator=gen) + 0.5) / (typical_code * k ** 0.5)
    packed = []
    for _ in range(num_experts):
        if fmt == "int4":
            q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        elif fmt == "int8":
            q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        else:
            q = (torch.randn(n, k, generator=gen) * 100).to(torch.float8_e4m3fn)
        offsets = -8 * scales if asymmetric else None
        packed.append(quant_gemm.pack(q.to(DEVICE), scales.to(DEVICE),
                                      None if offsets is None else offsets.to(DEVICE), fmt,
                                      group))
    return quant_gemm.stack(packed)


def _dense(stacked) -> torch.Tensor:
    return torch.stack([quant_gemm.unpack(quant_gemm.expert(stacked, e))
                        for e in range(stacked.codes.shape[0])])


# (format, w13's group, offsets): w13 takes K = 48 in groups of 16; w2 (K = 40) one group
# a channel, as FP8 checkpoints hold experts.
QUANTIZED = [("int4", 16, True), ("int8", 48, False), ("fp8_e4m3", 48, False),
             ("fp8_e4m3", 16, False)]


@pytest.mark.parametrize("fmt, group, asymmetric", QUANTIZED)
@pytest.mark.parametrize("num_experts, num_tokens, top_k, used", [(4, 1, 2, 4), (8, 70, 2, 8)])
def test_fused_moe_on_quantized_experts_equals_the_reference_on_their_weights(
        fmt, group, asymmetric, num_experts, num_tokens, top_k, used):
    hidden, w13, w2, weights, ids = _case(num_experts, num_tokens, top_k, used, seed=num_tokens)
    q13 = _quantized(w13, fmt, group, asymmetric, seed=1)
    q2 = _quantized(w2, fmt, INTER, asymmetric, seed=2)
    expected = reference.moe(hidden, _dense(q13), _dense(q2), weights, ids)
    torch.testing.assert_close(fused_moe(hidden, q13, q2, weights, ids), expected,
                               atol=1e-4, rtol=1e-4)
    # A rank of expert parallelism holding experts 2 and 3.
    local = [quant_gemm.stack([quant_gemm.expert(q, e) for e in (2, 3)]) for q in (q13, q2)]
    expected = reference.moe(hidden, _dense(q13)[2:4], _dense(q2)[2:4], weights, ids,
                             first_expert=2)
    torch.testing.assert_close(fused_moe(hidden, *local, weights, ids, first_expert=2),
                               expected, atol=1e-4, rtol=1e-4)


def test_experts_held_differently_are_not_stacked():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (32, 64), generator=gen, dtype=torch.uint8)
    grouped = quant_gemm.pack(q, torch.rand(32, 4), None, "int4", 16)
    per_channel = quant_gemm.pack(q, torch.rand(32, 1), None, "int4", 64)
    with pytest.raises(ValueError, match=r"expert 1 is held as .*'int4', 64.* expert 0 as "
                                         r".*'int4', 16"):
        quant_gemm.stack([grouped, per_channel])


def test_aligned_blocks_hold_one_expert_each_and_every_pair_once():
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [5, 3]])  # experts 2 and 4 get nothing
    sorted_pairs, block_experts = align_tokens(ids, num_experts=4, block_m=4, first_expert=0)
    num_pairs = ids.numel()
    pairs = sorted_pairs.view(-1, 4)
    flat = ids.flatten()
    seen = []
    for block, expert in zip(pairs.tolist(), block_experts.tolist(), strict=True):
        real = [p for p in block if p < num_pairs]
        if expert < 0:
            assert not real
            continue
        assert real and all(flat[p] == expert for p in real)
        seen += real
    # Expert 5 is another rank's: its pair (6) is in no block.
    assert sorted(seen) == [p for p in range(num_pairs) if flat[p] < 4]


needs_cpu_kernels = pytest.mark.skipif(not cpu_kernels.usable(),
                                       reason="the CPU kernels need a C++ compiler")


@needs_cpu_kernels
@pytest.mark.parametrize("num_experts, num_tokens, top_k, used", CASES + [(8, 0, 2, 8)])
def test_the_cpu_kernel_equals_the_reference(num_experts, num_tokens, top_k, used):
    hidden, w13, w2, weights, ids = (t.cpu() for t in _case(num_experts, num_tokens, top_k,
                                                            used, seed=num_tokens))
    got = cpu_kernels.fused_moe(hidden, *cpu_kernels.pack_moe(w13, w2), weights, ids)
    torch.testing.assert_close(got, reference.moe(hidden, w13, w2, weights, ids),
                               atol=1e-5, rtol=1e-5)


@needs_cpu_kernels
def test_the_cpu_kernel_on_a_rank_adds_only_its_experts_and_any_thread_count_agrees():
    hidden, w13, w2, weights, ids = (t.cpu() for t in _case(8, 70, 2, 8, seed=2))
    local = slice(4, 8)
    packed = cpu_kernels.pack_moe(w13[local].contiguous(), w2[local].contiguous())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.fused_moe(hidden, *packed, weights, ids, first_expert=4)
        torch.set_num_threads(2)
        two = cpu_kernels.fused_moe(hidden, *packed, weights, ids, first_expert=4)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each pair's sum has one order, whatever the split
    torch.testing.assert_close(one, reference.moe(hidden, w13[local], w2[local], weights, ids,
                                                  first_expert=4), atol=1e-5, rtol=1e-5)


def test_the_cpu_layout_pads_and_unpacks_to_the_same_weights():
    _, w13, w2, _, _ = (t.cpu() for t in _case(3, 1, 1, 3, seed=4))
    w13_packed, w2_packed = cpu_kernels.pack_moe(w13, w2)
    assert w13_packed.shape == (3, 48 // 16, HIDDEN, 32)  # I 40 -> 48
    assert w2_packed.shape == (3, 64 // 32, 48, 32)  # H 48 -> 64
    # Block 0, input 5: gate features 0..15 of expert 1, then its up features 0..15.
    torch.testing.assert_close(w13_packed[1, 0, 5], torch.cat([w13[1, :16, 5],
                                                               w13[1, INTER:INTER + 16, 5]]))
    assert not w13_packed[:, -1, :, 8:16].any()  # gate features 40..47: padding
    unpacked = cpu_kernels.unpack_moe(w13_packed, w2_packed, HIDDEN, INTER)
    assert torch.equal(unpacked[0], w13) and torch.equal(unpacked[1], w2)


@needs_cpu_kernels
def test_the_cpu_kernel_refuses_bad_inputs_naming_them():
    hidden, w13, w2, weights, ids = (t.cpu() for t in _case(4, 3, 2, 4, seed=1))
    packed = cpu_kernels.pack_moe(w13, w2)
    with pytest.raises(RuntimeError, match="hidden must be a contiguous"):
        cpu_kernels.extension().fused_moe(hidden.double(), *packed, weights, ids, 0)
    with pytest.raises(RuntimeError, match="w13 must be packed"):
        cpu_kernels.fused_moe(hidden, w13, w2, weights, ids)
    with pytest.raises(RuntimeError, match="topk_ids"):
        cpu_kernels.fused_moe(hidden, *packed, weights[:2], ids[:2])


@pytest.mark.parametrize("path", ["plain", "onednn", "kernel"])
@pytest.mark.parametrize("tp_size, expert_parallel", [(1, False), (2, False), (2, True)])
def test_the_cpu_path_equals_the_reference_on_every_shard(path, tp_size, expert_parallel):
    """Each rank's FusedMoE, loaded from whole per-expert tensors and then packed for the
    C++ kernel (as `pack_linear_weights` packs a float32 model), for oneDNN, or not at
    all, computes its share; the shares sum to the reference (what the layer's
    all-reduce does)."""
    if path == "kernel" and not cpu_kernels.usable():
        pytest.skip("the CPU kernels need a C++ compiler")
    hidden, w13, w2, weights, ids = (t.cpu() for t in _case(4, 21, 2, 3, seed=5))
    total = torch.zeros_like(hidden)
    for rank in range(tp_size):
        layer = FusedMoE(4, 2, HIDDEN, INTER, renormalize=True, tp=TPGroup(rank, tp_size),
                         expert_parallel=expert_parallel)
        for expert in range(4):
            layer.load_expert(layer.w13, w13[expert, :INTER], 2 * expert)
            layer.load_expert(layer.w13, w13[expert, INTER:], 2 * expert + 1)
            layer.load_expert(layer.w2, w2[expert], expert)
        dense = layer.dense_weights()
        if path == "kernel":
            assert pack_linear_weights(layer) == 1
        elif path == "onednn":  # what a bfloat16 model, or a machine without a compiler, takes
            assert layer.pack_for_cpu(kernel=False)
        if path != "plain":
            assert (layer.blocked if path == "kernel" else layer.packed) is not None
            assert layer.w13.is_meta
            for name, tensor in layer.dense_weights().items():
                assert torch.equal(tensor, dense[name])
        part = layer.experts(hidden, weights, ids)
        first = layer.first_expert
        local = slice(first, first + layer.num_local)
        if expert_parallel:
            expected = reference.moe(hidden, w13[local], w2[local], weights, ids, first)
            torch.testing.assert_close(part, expected, atol=1e-4, rtol=1e-4)
        total += part
    torch.testing.assert_close(total, reference.moe(hidden, w13, w2, weights, ids),
                               atol=1e-4, rtol=1e-4)


def test_routing_renormalizes_only_when_asked():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    weights, ids = route(logits, 2, renormalize=True)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, torch.softmax(logits[:, :2], -1))
    weights, _ = route(logits, 2, renormalize=False)
    torch.testing.assert_close(weights, torch.softmax(logits, -1)[:, :2])


def test_bad_shapes_are_refused_naming_them():
    hidden, w13, w2, weights, ids = _case(4, 3, 2, 4, seed=1)
    with pytest.raises(ValueError, match="shapes do not agree"):
        fused_moe(hidden, w13, w2[:, :, :-1].contiguous(), weights, ids)
    with pytest.raises(ValueError, match="w13 has dtype"):
        fused_moe(hidden, w13.double(), w2, weights, ids)
