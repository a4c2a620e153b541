"""A checkpoint's fp8 KV cache scales land on their layer's Attention (vLLM's and
compressed-tensors' names); anything else is left to the weight loader."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pagedserve.worker.layers.attention import Attention
from pagedserve.worker.layers.kv_scales import load_kv_scale


def _model(num_layers: int = 3) -> nn.Module:
    """The module paths of the model classes: model.layers.{i}.self_attn.attn."""
    root = nn.Module()
    root.model = nn.Module()
    root.model.layers = nn.ModuleList()
    for _ in range(num_layers):
        layer = nn.Module()
        layer.self_attn = nn.Module()
        layer.self_attn.attn = Attention(num_heads=4, num_kv_heads=2, head_dim=16)
        root.model.layers.append(layer)
    return root


def test_scales_by_every_name():
    model = _model()
    checkpoint = {
        "model.layers.0.self_attn.k_scale": torch.tensor(0.5),
        "model.layers.0.self_attn.v_scale": torch.tensor([0.25]),
        "model.layers.1.self_attn.k_proj.output_scale": torch.tensor([2.0]),
        "model.layers.1.self_attn.v_proj.output_scale": torch.tensor([4.0]),
        "model.layers.2.self_attn.kv_scale": torch.tensor(8.0, dtype=torch.bfloat16),
    }
    for name, tensor in checkpoint.items():
        assert load_kv_scale(model, name, tensor)
    scales = [(layer.self_attn.attn.k_scale, layer.self_attn.attn.v_scale)
              for layer in model.model.layers]
    assert scales == [(0.5, 0.25), (2.0, 4.0), (8.0, 8.0)]


def test_other_tensors_are_left_to_the_loader():
    model = _model()
    for name in ("model.layers.0.self_attn.k_proj.weight",
                 "model.layers.0.self_attn.k_proj.input_scale",
                 "model.layers.0.mlp.down_proj.weight_scale"):
        assert not load_kv_scale(model, name, torch.ones(1))
    assert model.model.layers[0].self_attn.attn.k_scale == 1.0


@pytest.mark.parametrize("name,tensor,message", [
    ("model.layers.0.self_attn.k_scale", torch.tensor(0.0), "one positive finite number, got 0.0"),
    ("model.layers.0.self_attn.v_scale", torch.tensor(float("inf")), "got inf"),
    ("model.layers.0.self_attn.k_scale", torch.ones(2), r"got shape \(2,\)"),
    ("model.layers.7.self_attn.k_scale", torch.tensor(1.0), "no attention layer"),
])
def test_bad_scales_are_refused(name, tensor, message):
    with pytest.raises(ValueError, match=message):
        load_kv_scale(_model(), name, tensor)


def test_a_checkpoints_scales_load_through_the_engine(tmp_path):
    """A checkpoint with vLLM's k_scale / v_scale loads (they are not weights), and the
    fp8 cache takes them."""
    from safetensors.torch import load_file, save_file

    from pagedserve import LLM, SamplingParams
    from pagedserve.testing import build_random_model

    source = build_random_model(tmp_path / "llama", arch="llama")
    state = load_file(source / "model.safetensors")
    state["model.layers.1.self_attn.k_scale"] = torch.tensor(0.5)
    state["model.layers.1.self_attn.v_scale"] = torch.tensor(0.25)
    save_file(state, source / "model.safetensors")
    llm = LLM(str(source), device="cpu", dtype="float32", num_gpu_blocks=32,
              max_model_len=64, kv_cache_dtype="fp8")
    layers = llm.engine.executor.worker.model.model.layers
    assert (layers[1].self_attn.attn.k_scale, layers[1].self_attn.attn.v_scale) == (0.5, 0.25)
    assert (layers[0].self_attn.attn.k_scale, layers[0].self_attn.attn.v_scale) == (1.0, 1.0)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}],
                       SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
