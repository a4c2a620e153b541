"""GGUF weights kept quantized in memory (worker/layers/quantized.py): Q4_0, Q4_1 and
Q8_0 linear and embedding weights stay as the file stores them, run through the
CPU kernel, and score prompts as transformers does with the same file dequantized.

The accuracy bounds are the ones a weight-only format must meet: prompt logprobs
within 0.02 (mean absolute) of transformers, the top-1 token equal at >= 97% of
positions. The weights themselves are exact (the file's integers, scales and
offsets), so the only differences left are float32 sums taken in another order.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from support.accuracy import prompt_scores
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams
from pagedserve.testing import build_random_model
from pagedserve.testing.gguf_model import rewrite_gguf, with_random_blocks, write_gguf
from pagedserve.worker.distributed import TPGroup
from pagedserve.worker.layers.quantized import quantized_of
from pagedserve.worker.models import build_model

ENGINE = dict(device="cpu", dtype="float32", num_gpu_blocks=64, max_model_len=128)
PROMPTS = [[7, 8, 9, 10, 11], [100, 200, 300, 40, 50, 60, 70], list(range(20, 60))]
LINEARS_PER_LAYER = 4  # qkv, o, gate_up, down


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("quantized") / "llama", arch="llama",
                              num_key_value_heads=2)


@pytest.fixture(scope="module")
def files(tmp_path_factory, source):
    root = tmp_path_factory.mktemp("quantized-files")
    return {kind: write_gguf(source, root / f"llama-{kind}.gguf", kind)
            for kind in ("Q4_0", "Q4_1", "Q8_0", "F32")}


def _quantized_weights(llm: LLM) -> int:
    model = llm.engine.executor.worker.model
    return sum(quantized_of(param) is not None for param in model.parameters())


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_kept_types_stay_quantized_within_the_accuracy_bounds(files, kind):
    path = files[kind]
    llm = LLM(str(path), **ENGINE)
    config = llm.engine.info.hf_config
    vocab_weights = 1 if config.tie_word_embeddings else 2  # the embedding, the LM head
    assert _quantized_weights(llm) == config.num_hidden_layers * LINEARS_PER_LAYER + vocab_weights
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                              dtype=torch.float32).eval()
    float_bytes = sum(p.numel() * 4 for p in hf.parameters())
    bits = 8 if kind == "Q8_0" else 4
    # `bits` per weight and a float32 scale and offset per 32 (2 bits a weight), and the
    # float32 norms: under (bits + 3) / 32 of the float model.
    assert llm.get_memory_stats()["weight_bytes"] < float_bytes * (bits + 3) / 32
    mean_difference, top1 = prompt_scores(llm, hf, PROMPTS)
    assert mean_difference <= 0.02 and top1 >= 0.97, (mean_difference, top1)
    with torch.inference_mode():
        expected = [hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)
                    [0, len(p):].tolist() for p in PROMPTS]
    greedy = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                          SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in greedy] == expected


# A Q4_K_M-like mix: 4-bit K blocks for most matrices, 6-bit for v, down and the vocab.
K_TYPES = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K",
           "ffn_gate": "Q5_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K", "token_embd": "Q6_K",
           "output": "Q6_K"}


def test_k_quant_blocks_stay_quantized_within_the_accuracy_bounds(tmp_path):
    """Rows of 256 (K blocks), random blocks (the gguf package cannot make K blocks from
    floats): q/k in Q4_K beside v in Q6_K make a fused weight of 8-bit values in groups
    of 16; transformers reading the same file is the oracle."""
    source = build_random_model(tmp_path / "wide", arch="llama", hidden_size=256,
                                num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=512)
    path = with_random_blocks(write_gguf(source, tmp_path / "wide-f32.gguf", "F32"),
                              tmp_path / "wide-k.gguf", K_TYPES)
    llm = LLM(str(path), **ENGINE)
    model = llm.engine.executor.worker.model
    assert _quantized_weights(llm) == llm.engine.info.hf_config.num_hidden_layers * 4 + 2
    qkv = quantized_of(model.model.layers[0].self_attn.qkv_proj.weight)
    assert (qkv.fmt, qkv.group) == ("int8", 16)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                              dtype=torch.float32).eval()
    mean_difference, top1 = prompt_scores(llm, hf, PROMPTS)
    assert mean_difference <= 0.02 and top1 >= 0.97, (mean_difference, top1)


def test_dequantize_keeps_the_float_model(files):
    llm = LLM(str(files["Q4_1"]), quantization="dequantize", **ENGINE)
    assert _quantized_weights(llm) == 0
    quantized = LLM(str(files["Q4_1"]), **ENGINE)
    assert (quantized.get_memory_stats()["weight_bytes"] * 4
            < llm.get_memory_stats()["weight_bytes"])


def test_types_without_a_kernel_are_dequantized_saying_so(source, files, tmp_path, caplog):
    assert _quantized_weights(LLM(str(files["F32"]), **ENGINE)) == 0
    path = write_gguf(source, tmp_path / "llama-Q5_0.gguf", "Q5_0")
    with caplog.at_level("WARNING", logger="pagedserve.worker.models"):
        llm = LLM(str(path), **ENGINE)
    assert _quantized_weights(llm) == 0
    assert "Q5_0 (" in caplog.text and "dequantized into torch.float32" in caplog.text


def test_a_fused_weight_with_a_part_of_another_type_is_dequantized(files, tmp_path):
    """Layer 0's k projection rewritten as F32: that layer's fused q/k/v weight is made
    whole in floats; every other weight stays quantized."""
    def as_float32(tensor):
        if tensor.name != "blk.0.attn_k.weight":
            return None
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32), None

    out = rewrite_gguf(files["Q4_1"], tmp_path / "mixed.gguf", as_float32)
    llm = LLM(str(out), **ENGINE)
    model = llm.engine.executor.worker.model
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert quantized_of(qkv.weight) is None and qkv.packed_weight is not None  # float, packed
    layers = llm.engine.info.hf_config.num_hidden_layers
    assert _quantized_weights(llm) == layers * LINEARS_PER_LAYER + 1  # all but that one
    reference = LLM(str(files["Q4_1"]), quantization="dequantize", **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    assert ([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in reference.generate(prompts, params,
                                                                  use_tqdm=False)])


@pytest.mark.parametrize("setting", [
    dict(async_scheduling=True),
    # A pool of 6 blocks of 16 (max_model_len 96) for 6 requests growing by 32 tokens:
    # preemption.
    dict(num_gpu_blocks=6, block_size=16, max_model_len=96, preemption_mode="recompute"),
    dict(num_gpu_blocks=6, block_size=16, max_model_len=96, preemption_mode="swap",
         swap_space=0.01),
    dict(enable_prefix_caching=False),
])
def test_quantized_weights_serve_alike_under_the_engines_features(files, setting):
    """The kernel's rows do not depend on the batch they share, so greedy tokens under
    async scheduling, preemption (recompute, swap) and without the prefix cache equal
    the plain engine's; each prompt runs twice, the second a prefix-cache hit."""
    prompts = [{"prompt_token_ids": p} for p in PROMPTS * 2]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    plain = LLM(str(files["Q4_1"]), **ENGINE)
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    llm = LLM(str(files["Q4_1"]), **{**ENGINE, **setting})
    assert _quantized_weights(llm) > 0
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == expected
    stats = llm.get_memory_stats()
    if "preemption_mode" in setting:
        assert stats["num_preemptions"] > 0
    if setting.get("preemption_mode") == "swap":
        assert stats["num_swap_preemptions"] > 0


def test_lora_on_quantized_weights_equals_lora_on_the_dequantized_file(source, files,
                                                                      tmp_path):
    from pagedserve import LoRARequest
    from pagedserve.testing.lora import build_lora_adapter

    adapter = LoRARequest("a", 1, str(build_lora_adapter(
        source, tmp_path / "adapter", 8, ["q_proj", "k_proj", "gate_proj", "down_proj"])))
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    runs = {}
    for quantization in ("auto", "dequantize"):
        llm = LLM(str(files["Q4_1"]), enable_lora=True, max_lora_rank=8,
                  quantization=quantization, **ENGINE)
        assert (_quantized_weights(llm) > 0) == (quantization == "auto")
        runs[quantization] = [o.outputs[0].token_ids for o in llm.generate(
            prompts, params, use_tqdm=False, lora_request=adapter)]
    assert runs["auto"] == runs["dequantize"]


def test_a_tensor_parallel_split_inside_a_block_is_refused(tmp_path):
    """Six heads of 16 over two ranks: each rank's o projection takes 48 input features,
    which cuts a block of 32."""
    source = build_random_model(tmp_path / "narrow", arch="llama", hidden_size=96,
                                num_attention_heads=6, num_key_value_heads=6,
                                intermediate_size=128)
    path = write_gguf(source, tmp_path / "narrow.gguf", "Q8_0")
    config = LLM(str(path), **ENGINE).engine.info.hf_config
    with pytest.raises(ValueError, match=r"o_proj.*tensor_parallel_size=2 into 48 input "
                                         r"features a rank.*cut a Q8_0 block of 32"):
        build_model(config, None, max_position=128, dtype=torch.float32,
                    device=torch.device("cpu"), load_format="gguf", tp=TPGroup(0, 2),
                    gguf_file=path, keep_quantized=True)
