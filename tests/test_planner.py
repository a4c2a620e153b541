"""The capacity planner against hand calculations and against real checkpoints' tensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from pagedserve import config as config_module
from pagedserve.cli import main
from pagedserve.model.checkpoint_files import weight_files
from pagedserve.model.shape import ModelShape, active_params, params_per_rank
from pagedserve.planner import format_plan, load_presets, plan
from pagedserve.testing import build_random_model, cached_random_model

CONFIG_DIR = Path(__file__).parent.parent / "configs"
GIB = 2**30


def _config(name: str, **sections: dict):
    """A shipped config with some keys of some sections replaced."""
    data = yaml.safe_load((CONFIG_DIR / name).read_text())
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return config_module.parse(data, name)


def _checkpoint_params(model_dir: Path) -> int:
    """Elements in the checkpoint's tensors (a tied LM head is not saved twice)."""
    total = 0
    for file in weight_files(model_dir):
        with safe_open(file, framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def test_llama_3_70b_tp4_matches_hand_calculation():
    # Llama-3-70B: vocab 128256, hidden 8192, intermediate 28672, 80 layers,
    # 64 query heads and 8 KV heads of 128; bfloat16 (2 bytes); 4 ranks.
    q_proj = o_proj = 8192 * 8192  # 64 heads x 128 = 8192
    k_proj = v_proj = 8192 * 1024  # 8 KV heads x 128 = 1024
    gate_proj = up_proj = down_proj = 8192 * 28672
    sharded = q_proj + k_proj + v_proj + o_proj + gate_proj + up_proj + down_proj
    norms = 2 * 8192  # input and post-attention RMSNorm, whole on every rank
    embed_tokens = lm_head = (128256 // 4) * 8192  # 32064 vocab rows per rank
    params_per_rank = 80 * (sharded // 4 + norms) + embed_tokens + lm_head + 8192
    weight_bytes = params_per_rank * 2
    kv_bytes_per_token = 2 * 80 * 2 * 128 * 2  # K and V x layers x KV heads per rank x dim x bytes

    step = 8192 * (4 * 8192 + (8192 + 2 * 1024) // 4 + 3 * 28672 // 4) * 2
    logits = 256 * 128256 * 4 * 2
    headroom = GIB + step + logits
    kv_budget = 80 * GIB * 0.9 - weight_bytes - headroom
    blocks = kv_budget // (16 * kv_bytes_per_token)
    tokens = blocks * 16
    seqs_at_mean_len = blocks // (2048 // 16)  # mean length max_model_len // 4
    seqs_preallocated = tokens // 8192

    result = plan(config_module.load(CONFIG_DIR / "llama-3-70b-tp4.yaml"), gpu_memory_gb=80)

    assert params_per_rank == 17_639_415_808
    assert result.params_per_rank == params_per_rank
    assert result.weight_bytes_per_rank == weight_bytes
    assert result.total_weight_bytes == 4 * weight_bytes
    assert result.model_params == 80 * (sharded + norms) + 2 * 128256 * 8192 + 8192  # 70.55B
    assert result.kv_bytes_per_token == kv_bytes_per_token
    assert result.tensor_parallel_size == 4 and result.dtype == "bfloat16"
    for figure, expected in [(result.headroom_bytes, headroom), (result.kv_budget_bytes, kv_budget),
                             (result.num_blocks, blocks), (result.num_cache_tokens, tokens),
                             (result.seqs_at_mean_len, seqs_at_mean_len),
                             (result.seqs_at_max_model_len, seqs_preallocated)]:
        assert figure == pytest.approx(expected, rel=0.02)


def test_llama_3_8b_on_one_gpu():
    result = plan(config_module.load(CONFIG_DIR / "llama-3-8b.yaml"), gpu_memory_gb=80)
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    params = 32 * per_layer + 2 * 128256 * 4096 + 4096
    assert params == 8_030_261_248  # Meta's published 8.03B
    assert result.params_per_rank == result.model_params == params
    assert result.weight_bytes_per_rank == result.total_weight_bytes == 2 * params
    assert result.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    headroom = GIB + 8192 * (4 * 4096 + 4096 + 2 * 1024 + 3 * 14336) * 2 + 256 * 128256 * 8
    blocks = (80 * GIB * 0.9 - 2 * params - headroom) // (16 * 131072)
    assert result.num_blocks == pytest.approx(blocks, rel=0.02)


def test_a_bigger_gpu_holds_more_blocks_and_mean_length_sets_concurrency():
    config = config_module.load(CONFIG_DIR / "llama-3-8b.yaml")
    small, big = plan(config, gpu_memory_gb=40), plan(config, gpu_memory_gb=80)
    assert small.weight_bytes_per_rank == big.weight_bytes_per_rank
    assert big.kv_budget_bytes - small.kv_budget_bytes == int(80 * GIB * 0.9) - int(40 * GIB * 0.9)
    short = plan(config, mean_seq_len=512)
    assert short.seqs_at_mean_len == short.num_blocks // 32


def test_70b_on_one_gpu_says_how_much_is_missing():
    config = _config("llama-3-70b-tp4.yaml", parallel={"tensor_parallel_size": 1})
    with pytest.raises(ValueError, match=r"does not fit[\s\S]*by \d+\.\d+ GiB"
                                         r"[\s\S]*parallel\.tensor_parallel_size=1"):
        plan(config, gpu_memory_gb=80)


@pytest.mark.parametrize("name, tp, field", [
    ("tiny-cpu-tp2.yaml", 3, "num_attention_heads=8"),
    ("llama-3-70b-tp4.yaml", 16, "num_key_value_heads=8"),  # 64 query heads would split
])
def test_tensor_parallel_size_must_divide_the_heads(name, tp, field):
    config = _config(name, parallel={"tensor_parallel_size": tp})
    with pytest.raises(ValueError, match=rf"parallel\.tensor_parallel_size={tp}[\s\S]*{field}"):
        plan(config)


@pytest.mark.parametrize("arch, overrides", [
    ("llama", dict(num_key_value_heads=2)),
    ("qwen2", dict(tie_word_embeddings=True)),  # q/k/v biases, one shared vocab matrix
])
def test_local_model_directory_counts_every_checkpoint_tensor(tmp_path, arch, overrides):
    model_dir = build_random_model(tmp_path / arch, arch=arch, **overrides)
    config = config_module.parse({"model": {"path": str(model_dir)},
                                  "engine": {"device": "cpu", "kv_cache_memory_gb": 0.01}})
    result = plan(config)
    assert result.params_per_rank == _checkpoint_params(model_dir)
    assert result.dtype == "float32"  # dtype auto: what config.json saved
    hf = json.loads((model_dir / "config.json").read_text())
    assert result.max_model_len == hf["max_position_embeddings"]
    kv_heads = hf["num_key_value_heads"]
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    assert result.kv_bytes_per_token == 2 * hf["num_hidden_layers"] * kv_heads * head_dim * 4
    assert result.num_blocks == int(0.01 * GIB) // (16 * result.kv_bytes_per_token)


def test_random_init_plans_the_model_the_engine_builds():
    config = config_module.load(CONFIG_DIR / "tiny-cpu.yaml")
    spec = config.model.random_init
    built = cached_random_model(spec.name, arch=spec.arch, seed=spec.seed, **spec.config_overrides)
    result = plan(config)
    assert result.params_per_rank == _checkpoint_params(built)
    assert result.model.vocab_size == json.loads((built / "config.json").read_text())["vocab_size"]
    # CPU: the KV budget is engine.kv_cache_memory_gb, with nothing taken for weights.
    assert result.gpu_memory_bytes is None and result.headroom_bytes is None
    assert result.kv_bytes_per_token == 2 * 4 * 4 * 32 * 4  # layers, KV heads, dim 256/8, float32
    assert result.num_blocks == int(0.25 * GIB) // (16 * result.kv_bytes_per_token)
    assert result.seqs_at_mean_len == result.num_blocks // (512 // 16)


def test_tp2_halves_the_kv_heads_and_the_sharded_weights():
    one = plan(config_module.load(CONFIG_DIR / "tiny-cpu.yaml"))
    two = plan(config_module.load(CONFIG_DIR / "tiny-cpu-tp2.yaml"))
    assert two.kv_bytes_per_token * 2 == one.kv_bytes_per_token
    assert two.num_blocks == 2 * one.num_blocks  # the same budget per rank, half the heads
    replicated = 4 * 2 * 256 + 256  # RMSNorm weights: 4 layers x 2, and the final one
    # 512 vocab rows split evenly
    assert two.params_per_rank * 2 - replicated == one.params_per_rank


@pytest.mark.parametrize("strategy, spread", [("STRICT_PACK", False), ("PACK", True),
                                               ("SPREAD", True), ("STRICT_SPREAD", True)])
def test_the_plan_says_when_a_tensor_parallel_group_may_cross_nodes(strategy, spread):
    report = format_plan(plan(_config("tiny-cpu-tp2.yaml",
                                      parallel={"placement_strategy": strategy})))
    placement = next(line for line in report.splitlines() if line.startswith("placement"))
    assert f"({strategy})" in placement
    assert ("all-reduces then cross the network" in placement) == spread, placement
    assert ("keep each replica's ranks on one node (placement_strategy STRICT_PACK)"
            in placement) == spread
    one_rank = format_plan(plan(_config("tiny-cpu.yaml",
                                        parallel={"placement_strategy": strategy})))
    assert "placement" not in one_rank  # one rank is on one node whatever the strategy


def test_unknown_hub_id_names_the_field_and_the_presets():
    config = config_module.parse({"model": {"path": "someone/unknown-model"}})
    with pytest.raises(ValueError) as info:
        plan(config)
    message = str(info.value)
    assert "model.path='someone/unknown-model'" in message and "directory" in message
    for name, hf in load_presets().items():
        assert name in message and all(hub_id in message for hub_id in hf["pagedserve_hub_ids"])


def test_presets_are_distinct_configs_of_supported_architectures():
    presets = load_presets()
    assert {"llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b",
            "qwen2-1.5b"} <= set(presets)
    hub_ids = [hub_id for hf in presets.values() for hub_id in hf["pagedserve_hub_ids"]]
    assert len(hub_ids) == len(set(hub_ids))
    architectures = {"llama": ["LlamaForCausalLM"], "qwen2": ["Qwen2ForCausalLM"],
                     "qwen3": ["Qwen3ForCausalLM"], "mixtral": ["MixtralForCausalLM"],
                     "qwen3_moe": ["Qwen3MoeForCausalLM"], "gemma3_text": ["Gemma3ForCausalLM"]}
    assert all(hf["architectures"] == architectures[hf["model_type"]] for hf in presets.values())


# Published sizes, in billions, total and active per token: Mistral's Mixtral-8x7B
# announcement (46.7 and 12.9) and Qwen3's model cards (8.2; 30.5 and 3.3).
PUBLISHED = [("mixtral-8x7b", 46.7, 12.9), ("qwen3-8b", 8.2, 8.2),
             ("qwen3-30b-a3b", 30.5, 3.3)]


def test_gemma_3_preset_interleaves_five_local_layers_with_one_global():
    """Gemma-3-12B's text model: 48 layers, every sixth global, the rest over 1,024
    positions; 11.77B parameters (Google's 12B counts the vision encoder too)."""
    shape = ModelShape.from_hf_config(load_presets()["gemma-3-12b"], "gemma-3-12b")
    assert [i for i, window in enumerate(shape.layer_windows) if window is None] == list(
        range(5, 48, 6))
    assert set(shape.layer_windows) == {None, 1024} and shape.context_limit == 131072
    assert params_per_rank(shape, 1) / 1e9 == pytest.approx(11.77, abs=0.01)


@pytest.mark.parametrize("name, total, active", PUBLISHED, ids=[row[0] for row in PUBLISHED])
def test_moe_and_qwen3_presets_match_their_published_sizes(name, total, active):
    shape = ModelShape.from_hf_config(load_presets()[name], name)
    # Within rounding: Qwen3-30B-A3B's card says 3.3 where the count is 3.35.
    assert params_per_rank(shape, 1) / 1e9 == pytest.approx(total, abs=0.06)
    assert active_params(shape) / 1e9 == pytest.approx(active, abs=0.06)


# Llama 2 (meta-llama/Llama-2-*-hf config.json): vocab 32000, untied LM head, float16,
# 4,096 positions. (preset, hidden, layers, heads, KV heads, intermediate, Meta's count)
LLAMA_2 = [("llama-2-7b", 4096, 32, 32, 32, 11008, 6_738_415_616),
           ("llama-2-13b", 5120, 40, 40, 40, 13824, 13_015_864_320),
           ("llama-2-70b", 8192, 80, 64, 8, 28672, 68_976_648_192)]


@pytest.mark.parametrize("name, hidden, layers, heads, kv_heads, inter, published", LLAMA_2,
                         ids=[row[0] for row in LLAMA_2])
def test_llama_2_presets_match_the_published_parameter_counts(name, hidden, layers, heads,
                                                              kv_heads, inter, published):
    hf = load_presets()[name]
    assert (hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"],
            hf["num_key_value_heads"], hf["intermediate_size"]) == (hidden, layers, heads,
                                                                    kv_heads, inter)
    assert (hf["vocab_size"], hf["max_position_embeddings"], hf["torch_dtype"],
            hf["tie_word_embeddings"]) == (32000, 4096, "float16", False)
    head_dim = hidden // heads
    attention = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim  # q, o; k, v
    per_layer = attention + 3 * hidden * inter + 2 * hidden  # + two RMSNorms
    params = layers * per_layer + 2 * 32000 * hidden + hidden  # embedding, LM head, final norm
    assert params == published
    for hub_id in (f"meta-llama/Llama-2-{name[8:]}-hf", f"meta-llama/Llama-2-{name[8:]}-chat-hf"):
        assert hub_id in hf["pagedserve_hub_ids"]
        # The hub id alone finds the preset; eight GPUs, so that even 70B fits.
        config = config_module.parse({"model": {"path": hub_id},
                                      "parallel": {"tensor_parallel_size": 8}})
        assert plan(config, gpu_memory_gb=80).model_params == published


def test_qwen2_1_5b_preset_matches_the_published_parameter_count():
    # Qwen/Qwen2-1.5B: hidden 1536, 28 layers, 12 heads and 2 KV heads of 128, intermediate
    # 8960, vocab 151936 shared by the embedding and the LM head; q, k, v have biases.
    q, kv = 1536, 2 * 128
    per_layer = 1536 * (q + 2 * kv) + (q + 2 * kv) + q * 1536 + 3 * 1536 * 8960 + 2 * 1536
    params = 28 * per_layer + 151936 * 1536 + 1536
    assert params == 1_543_714_304  # Qwen's published 1.54B
    result = plan(_config("qwen2-1.5b.yaml"), gpu_memory_gb=80)
    assert result.model_params == result.params_per_rank == params
    assert result.model.context_limit == 131072  # use_sliding_window is false
    assert result.dtype == "bfloat16" and result.kv_bytes_per_token == 2 * 28 * 2 * 128 * 2


@pytest.mark.parametrize("name, kib", [("llama-2-7b.yaml", 512), ("llama-2-13b.yaml", 800),
                                       ("llama-2-70b-tp4.yaml", 320)])
def test_llama_2_kv_bytes_per_token_in_float16(name, kib):
    # K and V x layers x KV heads x 128 x 2 bytes: 2*32*32*128*2, 2*40*40*128*2, 2*80*8*128*2
    whole = plan(_config(name, parallel={"tensor_parallel_size": 1}), gpu_memory_gb=1000)
    assert whole.dtype == "float16" and whole.kv_bytes_per_token == kib * 1024
    shipped = plan(_config(name), gpu_memory_gb=80)
    assert shipped.kv_bytes_per_token * shipped.tensor_parallel_size == kib * 1024


def test_llama_2_7b_fits_a_24_gib_gpu_and_13b_does_not():
    small = {"max_num_batched_tokens": 2048, "max_num_seqs": 64}
    fits = plan(_config("llama-2-7b.yaml", engine=small), gpu_memory_gb=24)
    weights = 2 * 6_738_415_616
    headroom = GIB + 2048 * (4 * 4096 + 3 * 4096 + 3 * 11008) * 2 + 64 * 32000 * 8
    assert fits.headroom_bytes == headroom
    assert fits.num_blocks == (int(24 * GIB * 0.9) - weights - headroom) // (16 * 512 * 1024)
    assert fits.seqs_at_max_model_len == fits.num_blocks * 16 // 4096 >= 1
    with pytest.raises(ValueError, match=r"does not fit[\s\S]*by \d+\.\d+ GiB"):
        plan(_config("llama-2-13b.yaml", engine=small), gpu_memory_gb=24)


def test_llama_2_70b_needs_the_four_gpus_of_its_config():
    with pytest.raises(ValueError, match=r"does not fit[\s\S]*tensor_parallel_size=1"):
        plan(_config("llama-2-70b-tp4.yaml", parallel={"tensor_parallel_size": 1}),
             gpu_memory_gb=80)
    result = plan(_config("llama-2-70b-tp4.yaml"), gpu_memory_gb=80)
    sharded = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672
    per_rank = 80 * (sharded // 4 + 2 * 8192) + 2 * 8000 * 8192 + 8192  # 8,000 vocab rows
    assert result.params_per_rank == per_rank == 17_245_151_232
    headroom = GIB + 8192 * (4 * 8192 + (8192 + 2 * 1024) // 4 + 3 * 28672 // 4) * 2 \
        + 256 * 32000 * 8
    assert result.num_blocks == (int(80 * GIB * 0.9) - 2 * per_rank - headroom) // (16 * 81920)


def test_cli_prints_the_plan(capsys):
    main(["plan", str(CONFIG_DIR / "llama-3-70b-tp4.yaml"), "--gpu-memory-gb", "80"])
    out = capsys.readouterr().out
    expected = plan(config_module.load(CONFIG_DIR / "llama-3-70b-tp4.yaml"))
    assert "4 GPUs" in out and f"{expected.num_blocks:,}" in out and "17,639,415,808" in out


def test_cli_json_and_mean_seq_len(capsys):
    main(["plan", str(CONFIG_DIR / "llama-3-70b-tp4.yaml"), "--json", "--mean-seq-len", "1024"])
    data = json.loads(capsys.readouterr().out)
    assert data["mean_seq_len"] == 1024 and data["seqs_at_mean_len"] == data["num_blocks"] // 64
    assert data["model"]["num_layers"] == 80


@pytest.mark.parametrize("yaml_text, expected", [
    ("model:\n  path: /x\nengine:\n  block_size: 12\n", "engine.block_size"),
    ("model:\n  path: someone/unknown-model\n", "model.path"),
])
def test_cli_bad_config_exits_2_naming_the_key(tmp_path, capsys, yaml_text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(SystemExit) as info:
        main(["plan", str(path)])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert expected in captured.err and "Traceback" not in captured.err and captured.out == ""


@pytest.mark.parametrize("name, changes, kwargs, message", [
    ("llama-3-8b.yaml", {}, {"mean_seq_len": 8193}, r"mean_seq_len=8193[\s\S]*max_model_len=8192"),
    ("llama-3-8b.yaml", {"model": {"max_model_len": 16384}}, {},
     r"model\.max_model_len=16384[\s\S]*8192"),
    ("llama-3-8b.yaml", {"engine": {"num_gpu_blocks": 10**6}}, {}, r"engine\.num_gpu_blocks"),
    ("tiny-cpu.yaml", {}, {"gpu_memory_gb": 16}, r"gpu_memory_gb=16[\s\S]*kv_cache_memory_gb"),
    ("tiny-cpu.yaml", {"engine": {"kv_cache_memory_gb": 0.001}}, {},
     r"fewer than the 128[\s\S]*engine\.kv_cache_memory_gb"),
], ids=["mean-seq-len", "max-model-len", "num-gpu-blocks", "gpu-memory-on-cpu", "pool-too-small"])
def test_plan_rejects_what_the_engine_would(name, changes, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan(_config(name, **changes), **kwargs)


def test_lora_slots_are_planned_as_the_worker_allocates_them():
    from pagedserve import LLM

    lora = {"enable_lora": True, "max_loras": 3, "max_lora_rank": 8}
    config = _config("tiny-cpu.yaml", lora=lora,
                     parallel={"distributed_executor_backend": "local"})
    planned = plan(config)
    llm = LLM(config=config)
    assert planned.lora_bytes_per_rank == llm.engine.executor.worker.lora.slot_bytes > 0
    assert "LoRA slots" in format_plan(planned)
    # On a GPU the slots come out of the KV budget. 4 adapters of rank 64 on Llama 3 8B:
    # per layer, A over the inputs of q, k, v, o, gate, up, down (6 x 4096 + 14336) and B
    # over their outputs (6144 for q, k, v; 4096; 2 x 14336; 4096), x 64 x 32 layers x
    # 4 slots x 2 bytes.
    base = _config("llama-3-8b.yaml")
    with_slots = _config("llama-3-8b.yaml", lora={"enable_lora": True, "max_loras": 4,
                                                  "max_lora_rank": 64})
    slot_bytes = (4096 * 6 + 14336 + 6144 + 4096 + 2 * 14336 + 4096) * 64 * 32 * 4 * 2
    assert plan(with_slots).lora_bytes_per_rank == slot_bytes
    assert plan(base).kv_budget_bytes - plan(with_slots).kv_budget_bytes == slot_bytes


# -- quantized weights and an FP8 KV cache ----------------------------------------------------

# Llama-3-70B's linear weights (q, k, v, o, gate, up, down of 80 layers) and the rest
# (embedding, LM head, norms), as in test_llama_3_70b_tp4_matches_hand_calculation.
LINEAR_70B = 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672)
OTHER_70B = 2 * 128256 * 8192 + 80 * 2 * 8192 + 8192


def test_w4a16_70b_fits_one_h100_where_its_bf16_weights_are_refused():
    """4 bits a weight and a bf16 scale per group of 128: 0.516 bytes a linear weight;
    the embedding, LM head and norms stay bf16. 36.8 GiB fits one 80 GB GPU."""
    config = _config("llama-3-70b-w4a16-h100-sim.yaml")
    result = plan(config, gpu_memory_gb=80)
    assert result.model.weight_scheme.name == "W4A16" and result.tensor_parallel_size == 1
    assert result.linear_params_per_rank == LINEAR_70B == 68_451_041_280
    assert result.weight_bytes_per_rank == LINEAR_70B * (4 / 8 + 2 / 128) + OTHER_70B * 2
    assert result.weight_bytes_per_rank / GIB == pytest.approx(36.79, abs=0.01)
    assert result.num_blocks == (result.kv_budget_bytes // (16 * 327_680)) > 6000
    report = format_plan(result)
    assert "W4A16 (compressed-tensors: 4-bit int in groups of 128, symmetric)" in report
    assert f"{result.num_blocks:,} x 16 tokens" in report
    # The same checkpoint dequantized holds 131 GiB of bf16: refused on one GPU.
    with pytest.raises(ValueError, match=r"does not fit[\s\S]*tensor_parallel_size=1"):
        plan(_config("llama-3-70b-w4a16-h100-sim.yaml", model={"quantization": "dequantize"}),
             gpu_memory_gb=80)


def test_fp8_weights_take_about_half_of_bf16s():
    """FP8 per channel: 1 byte a linear weight (and a scale per 4,096); at TP=4 the same
    shards as bf16's, at about half the bytes. The online FP8 of model.quantization
    holds the same."""
    bf16 = plan(_config("llama-3-70b-tp4.yaml"), gpu_memory_gb=80)
    checkpoint = plan(_config("llama-3-70b-tp4.yaml", model={
        "path": "RedHatAI/Llama-3.3-70B-Instruct-FP8-dynamic", "max_model_len": 8192}),
        gpu_memory_gb=80)
    online = plan(_config("llama-3-70b-tp4.yaml", model={"quantization": "fp8"}),
                  gpu_memory_gb=80)
    assert checkpoint.model.weight_scheme.name == online.model.weight_scheme.name == "FP8"
    assert checkpoint.params_per_rank == online.params_per_rank == bf16.params_per_rank
    assert checkpoint.weight_bytes_per_rank == online.weight_bytes_per_rank == round(
        LINEAR_70B / 4 * (1 + 2 / 4096)) + (bf16.params_per_rank - LINEAR_70B // 4) * 2
    assert 0.5 < checkpoint.weight_bytes_per_rank / bf16.weight_bytes_per_rank < 0.53
    assert checkpoint.num_blocks > bf16.num_blocks


def test_an_fp8_kv_cache_holds_twice_the_blocks_in_the_same_memory():
    bf16 = plan(_config("llama-3-8b.yaml"), gpu_memory_gb=80)
    fp8 = plan(_config("llama-3-8b.yaml", engine={"kv_cache_dtype": "fp8"}), gpu_memory_gb=80)
    assert fp8.kv_budget_bytes == bf16.kv_budget_bytes
    assert fp8.kv_bytes_per_token * 2 == bf16.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    assert fp8.num_blocks in (2 * bf16.num_blocks, 2 * bf16.num_blocks + 1)
    assert "65,536 bytes (fp8)" in format_plan(fp8)


def test_a_quantization_the_engine_does_not_run_is_refused_naming_it(tmp_path):
    hf = {key: value for key, value in load_presets()["llama-3-70b-w4a16"].items()
          if key != "pagedserve_hub_ids"}
    hf["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"quant_method='bitsandbytes' is not run; pagedserve "
                                         r"runs compressed-tensors W4A16"):
        plan(config_module.parse({"model": {"path": str(tmp_path), "max_model_len": 8192}}))
    with pytest.raises(ValueError, match=r"model.quantization='fp8'[\s\S]*already quantized "
                                         r"\(compressed-tensors\)"):
        plan(_config("llama-3-70b-w4a16-h100-sim.yaml", model={"quantization": "fp8"}))
