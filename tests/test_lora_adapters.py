"""LoRA adapters in PEFT's format: read, checked, refused (pagedserve/lora_request.py,
pagedserve/worker/lora_weights.py). The oracle is `peft` on the same files."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from pagedserve.errors import RequestError
from pagedserve.lora_request import LoRARequest, read_adapter_config
from pagedserve.worker.lora_weights import load_lora_weights, lora_delta

peft = pytest.importorskip("peft")


def _base(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)


def _adapter(tiny_llama, path: Path, **options) -> tuple[Path, object]:
    """A PEFT LoRA with non-zero B (init_lora_weights=False), saved at `path`."""
    torch.manual_seed(options.pop("seed", 0))
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False,
                                "target_modules": ["q_proj", "v_proj", "down_proj"], **options})
    model = peft.get_peft_model(_base(tiny_llama), config)
    model.save_pretrained(path)
    return path, model


def test_a_peft_adapter_reads_as_peft_applies_it(tiny_llama, tmp_path):
    path, model = _adapter(tiny_llama, tmp_path / "a")
    spec = read_adapter_config(path, max_lora_rank=16)
    assert (spec.rank, spec.scaling, spec.target_modules, spec.layers) == (
        4, 2.0, ("q_proj", "v_proj", "down_proj"), None)
    weights = load_lora_weights(spec, model.config)
    layers = model.config.num_hidden_layers
    assert sorted(weights.pairs) == sorted((i, m) for i in range(layers)
                                           for m in ("q_proj", "v_proj", "down_proj"))
    x = torch.randn(3, model.config.hidden_size)
    for layer in range(layers):
        attention = model.base_model.model.model.layers[layer].self_attn
        for name in ("q_proj", "v_proj"):
            module = getattr(attention, name)
            with torch.no_grad():
                adapted = module(x)
                base = module.base_layer(x)
            a, b = weights.pairs[layer, name]
            torch.testing.assert_close(base + lora_delta(x, a, b, spec.scaling), adapted)
            assert (adapted - base).abs().max() > 1e-3  # the adapter changes the output


def test_rslora_scales_by_the_square_root_of_the_rank(tiny_llama, tmp_path):
    path, _ = _adapter(tiny_llama, tmp_path / "a", r=8, lora_alpha=4, use_rslora=True)
    assert read_adapter_config(path, 16).scaling == pytest.approx(4 / math.sqrt(8))


def test_targets_as_a_regex_or_on_some_layers_only(tiny_llama, tmp_path):
    path, model = _adapter(tiny_llama, tmp_path / "a", target_modules=r".*\.(k_proj|up_proj)")
    spec = read_adapter_config(path, 16)
    assert (spec.target_modules, spec.layers) == (("k_proj", "up_proj"), None)
    layers = model.config.num_hidden_layers
    assert sorted(load_lora_weights(spec, model.config).pairs) == sorted(
        (i, m) for i in range(layers) for m in ("k_proj", "up_proj"))
    path, model = _adapter(tiny_llama, tmp_path / "b", target_modules=["o_proj", "gate_proj"],
                           layers_to_transform=[1])
    spec = read_adapter_config(path, 16)
    assert (spec.target_modules, spec.layers) == (("o_proj", "gate_proj"), (1,))
    assert sorted(load_lora_weights(spec, model.config).pairs) == [(1, "gate_proj"),
                                                                   (1, "o_proj")]


@pytest.mark.parametrize("options, words", [
    ({"r": 32, "lora_alpha": 32}, "rank 32 exceeds max_lora_rank=16"),
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "['embed_tokens'] are not supported"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"rank_pattern": {"q_proj": 2}}, "per-module ranks"),
])
def test_unsupported_adapters_are_refused_naming_the_reason(tiny_llama, tmp_path, options,
                                                            words):
    path, _ = _adapter(tiny_llama, tmp_path / "a", **options)
    with pytest.raises(RequestError, match=re.escape(words)) as caught:
        read_adapter_config(path, max_lora_rank=16)
    assert caught.value.param == "lora_request"


def test_missing_corrupt_and_mismatched_files_are_refused(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    path, model = _adapter(tiny_llama, tmp_path / "a")
    with pytest.raises(RequestError, match="has no adapter_config.json"):
        read_adapter_config(tmp_path / "nowhere", 16)
    spec = read_adapter_config(path, 16)
    weights_file = path / "adapter_model.safetensors"
    good = weights_file.read_bytes()
    weights_file.write_bytes(good[: len(good) // 2])
    with pytest.raises(RequestError, match="not a readable safetensors file"):
        load_lora_weights(spec, model.config)
    weights_file.write_bytes(good)
    tensors = load_file(weights_file)
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    save_file({**tensors, key: torch.zeros(4, 7)}, weights_file)
    with pytest.raises(RequestError, match=r"has shape \[4, 7\]; this base model and rank 4"):
        load_lora_weights(spec, model.config)
    save_file({k: v for k, v in tensors.items() if k != key}, weights_file)
    with pytest.raises(RequestError, match="has no lora_A weight"):
        load_lora_weights(spec, model.config)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(RequestError, match="not a readable JSON file"):
        read_adapter_config(path, 16)


def test_an_adapter_for_another_base_is_refused(tiny_llama, tmp_path):
    path, model = _adapter(tiny_llama, tmp_path / "a")
    other = model.config.__class__(**{**model.config.to_dict(),
                                      "hidden_size": model.config.hidden_size * 2})
    with pytest.raises(RequestError, match="this base model and rank 4 need"):
        load_lora_weights(read_adapter_config(path, 16), other)
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["r"] == 4  # untouched by the refusal


@pytest.mark.parametrize("fields, words", [
    (("", 1, "/x"), "lora_name must be a non-empty string"),
    (("a", 0, "/x"), "lora_int_id must be an integer >= 1"),
    (("a", True, "/x"), "lora_int_id must be an integer >= 1"),
])
def test_lora_request_checks_its_fields(fields, words):
    with pytest.raises(RequestError, match=words):
        LoRARequest(*fields)
