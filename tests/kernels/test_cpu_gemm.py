"""Linear layers on oneDNN GEMMs with weights packed once at load (kernels/cpu_gemm.py).

The ops are private to torch: the first test fails, naming them, if a torch
upgrade removes or changes them (the layers would then quietly fall back to
F.linear, and the CPU would lose its speed).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig

from pagedserve.kernels import cpu_gemm
from pagedserve.testing import build_random_model
from pagedserve.worker.distributed import TPGroup
from pagedserve.worker.layers.linear import dense_parameters, pack_linear_weights
from pagedserve.worker.models import build_model

MODEL = dict(arch="llama", vocab_size=300, hidden_size=64, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, num_hidden_layers=2,
             attention_bias=True, mlp_bias=True)


def test_torch_still_has_the_onednn_linear_ops():
    assert torch.backends.mkldnn.is_available(), "this torch build has no oneDNN"
    for name in ("_reorder_linear_weight", "_linear_pointwise"):
        assert hasattr(torch.ops.mkldnn, name), f"torch.ops.mkldnn.{name} is gone"
    assert cpu_gemm.available()


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [0, 1, 7, 300])
def test_packed_linear_equals_f_linear(dtype, tolerance, rows):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=gen).to(dtype)
    bias = torch.randn(96, generator=gen).to(dtype)
    x = torch.randn(rows, 64, generator=gen).to(dtype)
    packed = cpu_gemm.pack(weight)
    assert packed.shape == weight.shape and packed.dtype == dtype
    for b in (None, bias):
        got = cpu_gemm.linear(x, packed, b)
        assert got.shape == (rows, 96) and got.dtype == dtype
        torch.testing.assert_close(got, F.linear(x, weight, b), atol=tolerance, rtol=tolerance)
    x3 = x.view(1, rows, 64)
    torch.testing.assert_close(cpu_gemm.linear(x3, packed, None), F.linear(x3, weight),
                               atol=tolerance, rtol=tolerance)


def test_pack_refuses_what_it_cannot_pack():
    with pytest.raises(ValueError, match="cannot pack a torch.int32 weight"):
        cpu_gemm.pack(torch.zeros(4, 4, dtype=torch.int32))


def _build(model_dir, pack: bool, tied: bool = False, **kw):
    config = AutoConfig.from_pretrained(model_dir)
    config.tie_word_embeddings = tied
    return build_model(config, model_dir, max_position=64, dtype=torch.float32,
                       device=torch.device("cpu"), load_format=kw.pop("load_format",
                                                                      "safetensors"),
                       pack_cpu_weights=pack, **kw)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("gemm") / "m", **MODEL)


@pytest.mark.parametrize("tied", [False, True])
def test_every_linear_layer_is_packed_and_computes_the_same(model_dir, tied):
    plain, packed = _build(model_dir, False, tied), _build(model_dir, True, tied)
    layers = {name: m for name, m in packed.named_modules() if hasattr(m, "packed_weight")}
    assert len(layers) == 4 * MODEL["num_hidden_layers"] + 1  # qkv, o, gate_up, down; lm_head
    assert all(m.packed_weight is not None for m in layers.values())
    head = packed.lm_head.weight
    if tied:  # the embedding's table is shared: kept, and the LM head has its packed copy
        assert head is packed.model.embed_tokens.weight and head.device.type == "cpu"
    else:  # the plain weights are released: what is left is a meta tensor of their shape
        assert head.device.type == "meta"
        assert packed.model.layers[0].mlp.down_proj.weight.device.type == "meta"
    # The packed values are the loaded ones, and the logits agree.
    ours, theirs = dense_parameters(packed), dict(plain.named_parameters())
    for name, param in theirs.items():
        assert torch.equal(ours[name], param), name
    hidden = torch.randn(5, MODEL["hidden_size"])
    torch.testing.assert_close(packed.compute_logits(hidden), plain.compute_logits(hidden),
                               atol=1e-5, rtol=1e-5)
    layer = packed.model.layers[1].mlp.gate_up_proj
    torch.testing.assert_close(layer(hidden), plain.model.layers[1].mlp.gate_up_proj(hidden),
                               atol=1e-5, rtol=1e-5)


def test_tensor_parallel_ranks_pack_their_own_shard(model_dir):
    whole = dense_parameters(_build(model_dir, True))
    name = "model.layers.0.self_attn.o_proj.weight"  # row-parallel: split by columns
    shards = [dense_parameters(_build(model_dir, True, tp=TPGroup(rank, 2)))[name]
              for rank in range(2)]
    assert torch.equal(torch.cat(shards, dim=1), whole[name])


def test_dummy_weights_are_packed_too(model_dir):
    model = _build(model_dir, True, load_format="dummy")
    assert model.model.layers[0].self_attn.qkv_proj.packed_weight is not None


def test_without_onednn_the_layers_keep_f_linear(model_dir, monkeypatch):
    monkeypatch.setattr(cpu_gemm, "available", lambda: False)
    model = _build(model_dir, False)
    assert pack_linear_weights(model) == 0
    assert model.lm_head.packed_weight is None and model.lm_head.weight.device.type == "cpu"
    assert model.compute_logits(torch.randn(2, MODEL["hidden_size"])).shape == (2, 300)
