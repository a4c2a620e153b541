"""The batched LoRA kernels (kernels/lora.py) against the torch reference, and against
the plain per-adapter math, over ranks, slot counts and mixes of tokens."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels import lora, reference
from pagedserve.kernels.checks import interpreting

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not interpreting() else "cpu")
# The launchers check index values (slots, segments) on the CPU only: on a GPU the check
# would wait for the device, so there the caller's indices are trusted.
VALUES_ON_CPU_ONLY = "index values are checked on the CPU only"


def _stacks(gen, num_slots: int, ranks: list[int], max_rank: int, in_features: int,
            out_features: int, dtype: torch.dtype):
    """Stacked adapters, each of its own rank, zero-padded to max_rank."""
    a = torch.zeros(num_slots, max_rank, in_features)
    b = torch.zeros(num_slots, out_features, max_rank)
    for slot, rank in enumerate(ranks):
        a[slot, :rank] = torch.randn(rank, in_features, generator=gen) / in_features ** 0.5
        b[slot, :, :rank] = torch.randn(out_features, rank, generator=gen)
    return a.to(dtype).to(DEVICE), b.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ranks, max_rank", [([8], 8), ([4, 16, 8], 16), ([1, 64, 32, 7], 64)])
@pytest.mark.parametrize("in_features, out_features", [(64, 96), (200, 40)])
def test_shrink_and_expand_equal_the_reference_and_each_adapter_alone(
        ranks, max_rank, in_features, out_features, dtype):
    gen = torch.Generator().manual_seed(max_rank + in_features)
    num_slots, num_tokens = len(ranks), 37
    a, b = _stacks(gen, num_slots, ranks, max_rank, in_features, out_features, dtype)
    scaling = (torch.rand(num_slots, generator=gen) + 0.5).to(DEVICE)
    # A mix: base tokens (-1) and every slot, in runs (prefill) and scattered (decode).
    slots = torch.randint(-1, num_slots, (num_tokens,), generator=gen)
    slots[:9] = num_slots - 1
    slots = slots.to(DEVICE)
    x = torch.randn(num_tokens, in_features, generator=gen).to(dtype).to(DEVICE)
    base = torch.randn(num_tokens, out_features, generator=gen).to(dtype).to(DEVICE)

    h = lora.lora_shrink(x, a, slots, scaling)
    expected_h = reference.lora_shrink(x, a, slots, scaling)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(h, expected_h, **tol)
    y, expected_y = base.clone(), base.clone()
    lora.lora_expand(y, h, b, slots)
    reference.lora_expand(expected_y, expected_h, b, slots)
    torch.testing.assert_close(y, expected_y, **tol)
    # Each token's delta is its own adapter's, at its own rank; base tokens are untouched.
    for token in range(num_tokens):
        slot = int(slots[token])
        if slot < 0:
            assert torch.equal(y[token], base[token])
            continue
        rank = ranks[slot]
        delta = (x[token].float() @ a[slot, :rank].float().t() * scaling[slot]) \
            @ b[slot, :, :rank].float().t()
        torch.testing.assert_close(y[token].float(), base[token].float() + delta,
                                   atol=tol["atol"] * 10, rtol=tol["rtol"] * 10)


def test_expand_into_a_column_slice_of_a_fused_output():
    """q and v of a fused qkv output adapted, k left alone: strided rows."""
    gen = torch.Generator().manual_seed(1)
    num_tokens, hidden, q, kv, rank = 11, 32, 48, 16, 8
    a, b = _stacks(gen, 2, [rank, 4], rank, hidden, q, torch.float32)
    slots = torch.tensor([0, 1, -1, 0, 1, 1, -1, 0, 0, 1, 0], device=DEVICE)
    fused = torch.randn(num_tokens, q + 2 * kv, generator=gen).to(DEVICE)
    before = fused.clone()
    h = lora.lora_shrink(torch.randn(num_tokens, hidden, generator=gen).to(DEVICE), a, slots,
                         torch.ones(2, device=DEVICE))
    lora.lora_expand(fused[:, :q], h, b, slots)
    expected = before[:, :q].clone()
    reference.lora_expand(expected, h, b, slots)
    torch.testing.assert_close(fused[:, :q], expected)
    assert torch.equal(fused[:, q:], before[:, q:])  # k and v untouched


@pytest.mark.parametrize("call, words", [
    (lambda x, a, s, sc: lora.lora_shrink(x, a[:, :, :-1], s, sc), "takes 63 input features"),
    (lambda x, a, s, sc: lora.lora_shrink(x, a, s[:-1], sc), "slots has 4 entries for 5"),
    pytest.param(lambda x, a, s, sc: lora.lora_shrink(x, a, s + 5, sc), "below num_slots=2",
                 marks=pytest.mark.skipif(DEVICE.type == "cuda", reason=VALUES_ON_CPU_ONLY)),
    (lambda x, a, s, sc: lora.lora_shrink(x, a.half(), s, sc), "a_stack has dtype float16"),
    (lambda x, a, s, sc: lora.lora_shrink(x, a, s.float(), sc), "slots has dtype float32"),
    (lambda x, a, s, sc: lora.lora_shrink(x, a, s, sc[:1]), "scaling has 1 entries for 2"),
])
def test_the_launchers_name_what_they_refuse(call, words):
    x = torch.randn(5, 64, device=DEVICE)
    a = torch.zeros(2, 8, 64, device=DEVICE)
    slots = torch.tensor([0, 1, -1, 1, 0], device=DEVICE)
    with pytest.raises(ValueError, match=words):
        call(x, a, slots, torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match=r"h must be \[5, 8\]"):
        lora.lora_expand(torch.zeros(5, 16, device=DEVICE), torch.zeros(5, 4, device=DEVICE),
                         torch.zeros(2, 16, 8, device=DEVICE), slots)


def _segments(slots: torch.Tensor):
    """Runs of equal slots, as the model runner's sorted batches give them (LoRABatch)."""
    from pagedserve.worker.layers.lora import LoRABatch

    batch = LoRABatch()
    batch.set(slots.cpu().numpy(), torch.device("cpu"))
    host = batch.segments
    starts = torch.tensor([start for _, start, _ in host], dtype=torch.int32, device=DEVICE)
    lengths = torch.tensor([end - start for _, start, end in host], dtype=torch.int32,
                           device=DEVICE)
    segment_slots = torch.tensor([slot for slot, _, _ in host], dtype=torch.int32,
                                 device=DEVICE)
    return host, (starts, lengths, segment_slots), batch.max_length


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ranks, max_rank", [([8], 8), ([4, 16, 8], 16), ([1, 64, 32, 7], 64)])
@pytest.mark.parametrize("runs", [[(0, 40), (-1, 3), (1, 1), (2, 17)],  # prefills and a decode
                                  [(1, 1), (0, 1), (-1, 1), (2, 1), (0, 1)]])  # decodes
def test_segment_kernels_equal_the_per_token_ones(ranks, max_rank, runs, dtype):
    gen = torch.Generator().manual_seed(max_rank + len(runs))
    num_slots, in_features, out_features = len(ranks), 72, 40
    slots = torch.cat([torch.full((length,), slot if slot < num_slots else num_slots - 1)
                       for slot, length in runs]).to(DEVICE)
    a, b = _stacks(gen, num_slots, ranks, max_rank, in_features, out_features, dtype)
    scaling = (torch.rand(num_slots, generator=gen) + 0.5).to(DEVICE)
    x = torch.randn(len(slots), in_features, generator=gen).to(dtype).to(DEVICE)
    base = torch.randn(len(slots), out_features, generator=gen).to(dtype).to(DEVICE)
    host, segments, max_length = _segments(slots)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}

    h = lora.sgmv_shrink(x, a, segments, max_length, scaling)
    expected_h = reference.lora_shrink(x, a, slots, scaling)
    torch.testing.assert_close(h, expected_h, **tol)
    torch.testing.assert_close(reference.sgmv_shrink(x, a, host, scaling.tolist()),
                               expected_h, **tol)
    y, expected_y, host_y = base.clone(), base.clone(), base.clone()
    lora.sgmv_expand(y, h, b, segments, max_length)
    reference.lora_expand(expected_y, expected_h, b, slots)
    reference.sgmv_expand(host_y, expected_h, b, host)
    torch.testing.assert_close(y, expected_y, **tol)
    torch.testing.assert_close(host_y, expected_y, **tol)
    base_rows = slots < 0
    assert torch.equal(y[base_rows], base[base_rows])  # base tokens untouched


def test_segment_launchers_name_what_they_refuse():
    x = torch.randn(6, 64, device=DEVICE)
    a = torch.zeros(2, 8, 64, device=DEVICE)
    ones = torch.ones(2, device=DEVICE)
    segments = tuple(torch.tensor(v, dtype=torch.int32, device=DEVICE)
                     for v in ([0, 4], [4, 2], [0, 1]))
    if DEVICE.type == "cpu":  # VALUES_ON_CPU_ONLY
        with pytest.raises(ValueError, match="over max_length=3"):
            lora.sgmv_shrink(x, a, segments, 3, ones)
        with pytest.raises(ValueError, match="reach past the 5 tokens"):
            lora.sgmv_shrink(x[:5], a, segments, 4, ones)
    with pytest.raises(ValueError, match="lengths has 1 entries for 2 segments"):
        lora.sgmv_shrink(x, a, (segments[0], segments[1][:1], segments[2]), 4, ones)
    with pytest.raises(ValueError, match="starts has dtype int64"):
        lora.sgmv_shrink(x, a, (segments[0].long(), *segments[1:]), 4, ones)
    with pytest.raises(ValueError, match=r"h must be \[6, 8\]"):
        lora.sgmv_expand(torch.zeros(6, 16, device=DEVICE), torch.zeros(6, 4, device=DEVICE),
                         torch.zeros(2, 16, 8, device=DEVICE), segments, 4)
