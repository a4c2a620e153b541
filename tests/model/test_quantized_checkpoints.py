"""Quantized HF checkpoints (compressed-tensors W4A16, W8A16, FP8; AWQ; GPTQ; FP8 with
block scales) and online FP8 stay quantized in memory and score prompts as
transformers does on the same weights dequantized.

Each checkpoint is written from one float random model by the format's own tools
(pagedserve/testing/quantized_model.py: compressed-tensors' compressors pack its
formats and give the dequantized oracle). The bounds are the issue's: mean
|logprob difference| at most 0.02 and the top token agreeing at 97% of positions.
The weights are equal, so what differs is the order of float32 sums (the kernel
sums a group's integer products, then scales them): a few 1e-6 here.
"""

from __future__ import annotations

import pytest
import torch
from support.accuracy import prompt_scores
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams
from pagedserve.config import parse
from pagedserve.testing import build_random_model
from pagedserve.testing.quantized_model import FORMATS, write_oracle, write_quantized
from pagedserve.worker.layers.quantized import quantized_of

ENGINE = dict(device="cpu", dtype="float32", num_gpu_blocks=64, max_model_len=128)
PROMPTS = [[7, 8, 9, 10, 11], [100, 200, 300, 40, 50, 60, 70], list(range(20, 60))]
LINEARS_PER_LAYER = 4  # qkv, o, gate_up, down
# Hidden 256 and MLP 512: groups of 128 whole at TP=2 as well.
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
             num_key_value_heads=2, num_hidden_layers=2)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("ct") / "llama", arch="llama", **SHAPE)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, source):
    root = tmp_path_factory.mktemp("ct-formats")
    return {fmt: write_quantized(source, root / fmt, fmt) for fmt in FORMATS}


def _oracle(source, weights: dict[str, torch.Tensor], tmp_path):
    """transformers on the weights the quantized checkpoint stands for."""
    oracle = write_oracle(source, weights, tmp_path / "oracle")
    return AutoModelForCausalLM.from_pretrained(oracle, dtype=torch.float32).eval()


def _kept(llm: LLM) -> int:
    model = llm.engine.executor.worker.model
    return sum(quantized_of(param) is not None for param in model.parameters())


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_stays_quantized_within_the_accuracy_bounds(source, checkpoints, fmt,
                                                                 tmp_path):
    path, weights = checkpoints[fmt]
    llm = LLM(str(path), **ENGINE)
    layers = llm.engine.info.hf_config.num_hidden_layers
    assert _kept(llm) == layers * LINEARS_PER_LAYER
    hf = _oracle(source, weights, tmp_path)
    linear_bytes = sum(w.numel() for w in weights.values()) * 4
    float_bytes = sum(p.numel() * 4 for p in hf.parameters())
    bits = 4 if fmt in ("w4a16", "w4a16-asym", "awq", "gptq") else 8
    # The linear layers at `bits` a weight and a float32 scale and offset per group (at
    # most 0.5 bits a weight for groups of 128), the rest in float32.
    held = float_bytes - linear_bytes + linear_bytes * (bits + 0.5) / 32
    assert llm.get_memory_stats()["weight_bytes"] <= held
    mean_difference, top1 = prompt_scores(llm, hf, PROMPTS)
    assert mean_difference <= 0.02 and top1 >= 0.97, (mean_difference, top1)


def test_online_fp8_quantizes_each_output_channel_at_load(source):
    llm = LLM(str(source), quantization="fp8", **ENGINE)
    assert _kept(llm) == SHAPE["num_hidden_layers"] * LINEARS_PER_LAYER
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():  # the oracle: each row rounded to e4m3 under its own amax / 448
        for name, param in hf.named_parameters():
            if name.endswith("proj.weight"):
                scale = param.abs().amax(dim=1, keepdim=True) / 448
                param.copy_((param / scale).to(torch.float8_e4m3fn).float() * scale)
    mean_difference, top1 = prompt_scores(llm, hf, PROMPTS)
    assert mean_difference <= 0.02 and top1 >= 0.97, (mean_difference, top1)


def test_dequantize_serves_the_float_model_of_the_checkpoint(source, checkpoints, tmp_path):
    path, weights = checkpoints["awq"]
    llm = LLM(str(path), quantization="dequantize", **ENGINE)
    assert _kept(llm) == 0
    hf = _oracle(source, weights, tmp_path)
    assert llm.get_memory_stats()["weight_bytes"] == sum(p.numel() * 4 for p in hf.parameters())
    mean_difference, top1 = prompt_scores(llm, hf, PROMPTS)
    assert mean_difference <= 1e-4 and top1 == 1.0


@pytest.mark.parametrize("fmt", ["w4a16", "fp8-dynamic"])
def test_moe_experts_stay_quantized_within_the_accuracy_bounds(tmp_path, fmt):
    """Qwen3-MoE, as Qwen3-30B-A3B's W4A16 and FP8 checkpoints hold it: every expert's
    gate, up and down projections quantized, the router in float."""
    source = build_random_model(tmp_path / "moe", arch="qwen3_moe", moe_intermediate_size=128,
                                **SHAPE)
    path, weights = write_quantized(source, tmp_path / fmt, fmt)
    llm = LLM(str(path), **ENGINE)
    layer = llm.engine.executor.worker.model.model.layers[0].mlp.experts
    assert len(quantized_of(layer.w13)) == len(quantized_of(layer.w2)) == layer.num_experts
    mean_difference, top1 = prompt_scores(llm, _oracle(source, weights, tmp_path), PROMPTS)
    assert mean_difference <= 0.02 and top1 >= 0.97, (mean_difference, top1)


def test_w4a16_at_tp2_equals_tp1(ray_cluster, checkpoints):
    path, _ = checkpoints["w4a16-asym"]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]

    params = SamplingParams(temperature=0.0, max_tokens=8)
    whole = LLM(str(path), **ENGINE)
    expected = [o.outputs[0].token_ids for o in whole.generate(prompts, params, use_tqdm=False)]
    config = parse({"model": {"path": str(path), "dtype": "float32", "max_model_len": 128},
                    "engine": {"device": "cpu", "num_gpu_blocks": 64},
                    "parallel": {"tensor_parallel_size": 2, "distributed_executor_backend": "ray",
                                 "worker_cpus": 0.25}})
    llm = LLM(config=config)
    try:
        # Rank 0 holds half of each linear layer, still quantized, and the whole embedding.
        held, tp1 = llm.get_memory_stats()["weight_bytes"], whole.get_memory_stats()["weight_bytes"]
        assert tp1 * 0.5 < held < tp1 * 0.8, (held, tp1)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)
                ] == expected
    finally:
        llm.shutdown()


def _with_config(path, tmp_path, change):
    import json
    import shutil

    out = tmp_path / "changed"
    shutil.copytree(path, out)
    config = json.loads((out / "config.json").read_text())
    change(config["quantization_config"])
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(quant_method="bitsandbytes"),
     r"quant_method='bitsandbytes' is not run; pagedserve runs compressed-tensors W4A16"),
    (lambda c: c["config_groups"]["group_0"].update(
        input_activations={"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}),
     r"4-bit int, strategy 'group', format 'pack-quantized' with 8-bit int activations "
     r"\(W4A8\) is not run"),
    (lambda c: c["config_groups"]["group_0"]["weights"].update(num_bits=2),
     r"2-bit int.* is not run"),
])
def test_schemes_without_a_kernel_are_refused_at_start(checkpoints, tmp_path, change, message):
    path = _with_config(checkpoints["w4a16"][0], tmp_path, change)
    with pytest.raises(ValueError, match=message):
        LLM(str(path), **ENGINE)


def test_act_order_gptq_and_fp8_over_a_quantized_checkpoint_are_refused(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _with_config(checkpoints["gptq"][0], tmp_path, lambda c: c.update(desc_act=True))
    state = load_file(path / "model.safetensors")
    g_idx = "model.layers.0.self_attn.o_proj.g_idx"
    state[g_idx] = state[g_idx].flip(0).contiguous()
    save_file(state, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"o_proj'.*g_idx is in activation order"):
        LLM(str(path), **ENGINE)
    with pytest.raises(ValueError, match=r"model.quantization='fp8' quantizes a float "
                                         r"checkpoint at load.*already quantized \(awq\)"):
        LLM(str(checkpoints["awq"][0]), quantization="fp8", **ENGINE)


def test_lora_adapters_apply_over_quantized_weights_as_peft_over_the_float_ones(
        source, checkpoints, tmp_path):
    """The adapter's delta, in float, adds to the quantized layer's output: greedy tokens
    equal peft's over transformers running the dequantized weights."""
    from pagedserve import LoRARequest
    from pagedserve.testing.lora import build_lora_adapter, peft_greedy

    path, weights = checkpoints["w4a16-asym"]
    adapter = build_lora_adapter(source, tmp_path / "adapter", 8,
                                 ["q_proj", "v_proj", "o_proj", "down_proj"])
    expected = peft_greedy(write_oracle(source, weights, tmp_path / "oracle"), adapter,
                           PROMPTS, max_new_tokens=8)
    llm = LLM(str(path), enable_lora=True, max_lora_rank=8, **ENGINE)
    assert _kept(llm) == SHAPE["num_hidden_layers"] * LINEARS_PER_LAYER
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                           SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False,
                           lora_request=LoRARequest("a", 1, str(adapter)))
    assert [o.outputs[0].token_ids for o in outputs] == expected
    base = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in base] != expected  # the adapter changes the text
