"""The simulated accelerator: step times against hand-computed figures, a KV pool
sized as the planner sizes a GPU's, tokens that exercise detokenizing and stop
strings, and step statistics that add up.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from support import REPO

from pagedserve import LLM, SamplingParams
from pagedserve.config import load
from pagedserve.model.roofline import GPUS, Roofline, StepShape
from pagedserve.model.shape import (
    ModelShape,
    linear_params_per_rank,
    load_presets,
    params_per_rank,
)
from pagedserve.planner import plan

CONFIGS = REPO / "configs"
SIM_8B = CONFIGS / "llama-3-8b-h200-sim.yaml"
SIM_70B = CONFIGS / "llama-3-70b-tp4-h100-sim.yaml"
# Llama-3-8B in bf16 (BENCHMARKS.md, "Published figures we compare against"):
# 8,030,261,248 parameters, 128 KiB of KV a token.
WEIGHTS_8B = 8_030_261_248 * 2
KV_8B = 2 * 32 * 8 * 128 * 2


def shape(name: str, quantization: str = "auto") -> ModelShape:
    return ModelShape.from_hf_config(load_presets()[name], name, quantization)


def test_decode_step_is_weights_and_kv_over_bandwidth():
    """256 decodes of 1,024-token contexts on an H200: 50.4 GB read at 0.57 x 4.18 TB/s,
    the share of the copy's rate pagedserve's decode steps sustained there."""
    roofline = Roofline(GPUS["h200"], shape("llama-3-8b"), tp=1, dtype_bytes=2)
    assert roofline.weight_bytes == WEIGHTS_8B
    assert roofline.kv_bytes_per_token == KV_8B == 131072
    step = [StepShape(num_tokens=1, context_len=1024, samples=True)] * 256
    rate = 0.57 * 4.18e12
    by_hand = (WEIGHTS_8B + 256 * 1024 * KV_8B + 256 * KV_8B) / rate
    assert roofline.step_time(step) == pytest.approx(by_hand, rel=1e-9)
    assert by_hand == pytest.approx(21.17e-3, rel=1e-3)
    # Twice the contexts: the KV term doubles, the weights stay.
    longer = [StepShape(1, 2048, True)] * 256
    assert roofline.step_time(longer) - roofline.step_time(step) == pytest.approx(
        256 * 1024 * KV_8B / rate, rel=1e-9)


def test_prefill_step_is_flops_over_sustained_throughput():
    """One 8,192-token prompt: 2 FLOPs per weight per token plus causal attention."""
    model = shape("llama-3-8b")
    gpu = GPUS["h200"]
    roofline = Roofline(gpu, model, tp=1, dtype_bytes=2)
    tokens = 8192
    embedding = model.vocab_size * model.hidden_size  # and as many in the LM head
    body = WEIGHTS_8B // 2 - 2 * embedding
    attention = 4 * 32 * 4096 * (tokens * (tokens + 1) // 2)
    flops = 2 * body * tokens + 2 * embedding + attention
    by_hand = flops / (989e12 * gpu.tensor_efficiency)
    assert roofline.step_time([StepShape(tokens, tokens, True)]) == pytest.approx(by_hand,
                                                                                  rel=1e-9)
    assert 0.15 < by_hand < 0.2  # ~130 TFLOP at ~770 TFLOP/s


def test_a_moe_step_reads_the_experts_its_tokens_touch():
    """Qwen3-30B-A3B on an H100 (128 experts, top 8): one decode token reads its 8 experts
    of each layer, 256 tokens nearly all 128 (the union of their choices); the FLOPs per
    token are those of the 3.35B active parameters."""
    model = shape("qwen3-30b-a3b")
    gpu = GPUS["h100-sxm"]
    roofline = Roofline(gpu, model, tp=1, dtype_bytes=2)
    per_expert = 3 * 2048 * 768
    experts = 48 * 128 * per_expert
    assert roofline.expert_params == experts
    assert roofline.touched_experts(1) == pytest.approx(8 / 128)
    assert roofline.touched_experts(256) == pytest.approx(1 - (120 / 128) ** 256)
    rate = gpu.copy_bandwidth * gpu.memory_efficiency
    one = [StepShape(1, 100, True)]
    read = roofline.weight_bytes - 2 * experts * (1 - 8 / 128)
    by_hand = (read + 101 * roofline.kv_bytes_per_token) / rate
    assert roofline.step_time(one) == pytest.approx(by_hand, rel=1e-9)
    # About a tenth of the 61 GB of weights: the dense layers, the vocabulary and 8 experts.
    assert 5e9 < read < 8e9
    # Under expert parallelism over two GPUs, each rank holds and reads half of that.
    ep2 = Roofline(gpu, model, tp=2, dtype_bytes=2)
    assert ep2.expert_params == experts / 2
    # A long prompt is compute-bound: 2 FLOPs per active parameter per token.
    prompt = 4096
    body = roofline.body_params - experts + 48 * 8 * per_expert
    attention = 4 * 48 * 32 * 128 * (prompt * (prompt + 1) // 2)
    flops = 2 * body * prompt + 2 * roofline.lm_head_params + attention
    assert roofline.step_time([StepShape(prompt, prompt, True)]) == pytest.approx(
        flops / gpu.sustained_flops, rel=1e-9)


def test_sliding_layers_read_only_their_window():
    """Gemma-3-12B (48 layers, 8 global, 40 over 1,024 positions): a decode token at
    8,192 positions reads 8 x 8,192 + 40 x 1,024 positions' KV, not 48 x 8,192."""
    model = shape("gemma-3-12b")
    gpu = GPUS["h100-sxm"]
    roofline = Roofline(gpu, model, tp=1, dtype_bytes=2)
    per_layer = 2 * 8 * 256 * 2  # K and V of 8 KV heads x 256, bf16
    assert roofline.kv_bytes_per_token == 48 * per_layer
    read = roofline.weight_bytes + (8 * 8192 + 40 * 1024) * per_layer
    written = roofline.kv_bytes_per_token
    step = [StepShape(1, 8192, True)]
    assert roofline.step_time(step) == pytest.approx(
        (read + written) / (gpu.copy_bandwidth * gpu.memory_efficiency), rel=1e-9)


def test_tensor_parallel_adds_two_all_reduces_per_layer():
    model = shape("llama-3-70b")
    gpu = GPUS["h100-sxm"]
    tp4 = Roofline(gpu, model, tp=4, dtype_bytes=2)
    tokens = 256
    ring = 2 * 3 / 4 * tokens * 8192 * 2 / gpu.link_bandwidth
    assert tp4.allreduce_time(tokens) == pytest.approx(2 * 80 * (ring + gpu.allreduce_latency_s))
    step = [StepShape(1, 1024, True)] * tokens
    memory = (tp4.weight_bytes + tokens * 1025 * tp4.kv_bytes_per_token) / (
        gpu.copy_bandwidth * gpu.memory_efficiency)
    assert tp4.step_time(step) == pytest.approx(memory + tp4.allreduce_time(tokens))
    assert Roofline(gpu, model, tp=1, dtype_bytes=2).allreduce_time(tokens) == 0.0


def test_quantized_weights_and_an_fp8_kv_cache_shorten_a_decode_step():
    """Llama-3-8B on an H200, 256 decodes of 1,024-token contexts: FP8 weights (1 byte a
    linear weight; the 2.1 GB of embedding and LM head still bf16) and an FP8 KV cache
    (64 KiB a token) read 9.1 + 17.2 GB where bf16 reads 16.1 + 34.4: 11.0 ms, not 21.2."""
    gpu, step = GPUS["h200"], [StepShape(1, 1024, True)] * 256
    bf16 = Roofline(gpu, shape("llama-3-8b"), tp=1, dtype_bytes=2)
    fp8 = Roofline(gpu, shape("llama-3-8b", "fp8"), tp=1, dtype_bytes=2, kv_dtype_bytes=1)
    linear = linear_params_per_rank(fp8.shape, 1)
    assert fp8.weight_bytes == round(linear * (1 + 2 / 4096)) + (8_030_261_248 - linear) * 2
    assert fp8.kv_bytes_per_token == KV_8B // 2
    rate = gpu.copy_bandwidth * gpu.memory_efficiency
    by_hand = (fp8.weight_bytes + 256 * 1025 * KV_8B // 2) / rate
    assert fp8.step_time(step) == pytest.approx(by_hand, rel=1e-9)
    assert bf16.step_time(step) / fp8.step_time(step) == pytest.approx(1.92, abs=0.01)
    # W4A16: a quarter of the linear bytes and their group scales; FLOPs unchanged.
    w4a16 = Roofline(GPUS["h100-sxm"], shape("llama-3-70b-w4a16"), tp=1, dtype_bytes=2)
    assert w4a16.weight_bytes == round(w4a16.linear_params * (0.5 + 2 / 128)) + (
        params_per_rank(w4a16.shape, 1) - w4a16.linear_params) * 2
    assert w4a16.linear_flops_rate == GPUS["h100-sxm"].sustained_flops


def test_a_moe_step_reads_its_touched_experts_at_their_fp8_bytes():
    """Qwen3-30B-A3B-FP8 (fp8 in [128, 128] blocks): the experts one decode token skips
    are 1.0002 bytes a weight each (a float32 scale a block), not bf16's 2."""
    model = shape("qwen3-30b-a3b-fp8")
    assert model.weight_scheme.block == (128, 128)
    gpu = GPUS["h100-sxm"]
    roofline = Roofline(gpu, model, tp=1, dtype_bytes=2)
    assert roofline.linear_weight_bytes == 1 + 4 / (128 * 128)
    skipped = 48 * 128 * 3 * 2048 * 768 * (1 - 8 / 128) * roofline.linear_weight_bytes
    one = [StepShape(1, 100, True)]
    assert roofline.step_time(one) == pytest.approx(
        (roofline.weight_bytes - skipped + 101 * roofline.kv_bytes_per_token)
        / gpu.sustained_bandwidth, rel=1e-9)


def test_fp8_linear_layers_compute_at_the_fp8_rate_on_hopper_only():
    """A prefill of 8,192 tokens: the linear layers' FLOPs at 1,979 TFLOPS dense FP8 on an
    H200, attention and the LM head at bf16's 989; an A100 has no FP8 tensor cores."""
    tokens, model = 8192, shape("llama-3-8b", "fp8")
    prefill = [StepShape(tokens, tokens, True)]
    linear = 2 * linear_params_per_rank(model, 1) * tokens
    embedding = model.vocab_size * model.hidden_size
    norms = 8_030_261_248 - linear_params_per_rank(model, 1) - 2 * embedding
    other = (2 * norms * tokens + 2 * embedding
             + 4 * 32 * 4096 * (tokens * (tokens + 1) // 2))
    h200 = GPUS["h200"]
    fp8 = Roofline(h200, model, tp=1, dtype_bytes=2)
    assert fp8.step_time(prefill) == pytest.approx(
        linear / (1979e12 * 0.78) + other / (989e12 * 0.78), rel=1e-9)
    bf16 = Roofline(h200, shape("llama-3-8b"), tp=1, dtype_bytes=2)
    assert 1.6 < bf16.step_time(prefill) / fp8.step_time(prefill) < 2.0
    a100 = GPUS["a100-80gb"]
    assert a100.dense_fp8_flops is None
    assert Roofline(a100, model, tp=1, dtype_bytes=2).step_time(prefill) == pytest.approx(
        (linear + other) / a100.sustained_flops, rel=1e-9)


def test_every_gpu_cites_its_sources():
    for gpu in GPUS.values():
        assert "data sheet" in gpu.sources
        assert gpu.copy_bandwidth < gpu.memory_bytes * 1e3  # bytes/s, not a typo of GB/s
        assert 0 < gpu.tensor_efficiency < 1 and 0 < gpu.memory_efficiency < 1


@pytest.fixture(scope="module")
def tokenizer_dir(embedded_gguf):
    """The embedded model's tokenizer, standing in for Llama-3's."""
    from pagedserve.model.gguf_file import metadata_dir

    return str(metadata_dir(embedded_gguf))


def sim_config(path: Path, tokenizer_dir: str, **engine):
    data = load(path).model_dump()
    data["model"]["tokenizer"] = tokenizer_dir
    data["engine"].update(engine)
    from pagedserve.config import parse

    return parse(data)


@pytest.fixture(scope="module")
def llm(tokenizer_dir):
    llm = LLM(config=sim_config(SIM_8B, tokenizer_dir))
    yield llm
    llm.shutdown()


def test_the_pool_is_sized_as_the_planner_sizes_an_h200(llm, tokenizer_dir):
    config = sim_config(SIM_8B, tokenizer_dir)
    planned = plan(config, gpu_memory_gb=GPUS["h200"].memory_bytes / 2**30)
    assert llm.get_memory_stats()["total_blocks"] == planned.num_blocks
    assert planned.num_blocks * 16 > 800_000  # tokens of KV beside 16 GB of weights


def test_the_pool_of_fp8_weights_and_kv_is_sized_as_the_planner_sizes_it(tokenizer_dir):
    """The simulated H200 holds Llama-3-8B with model.quantization fp8 and an FP8 KV cache
    as the planner does: 0.57 of bf16's weight bytes (the vocabulary stays bf16), and
    twice the blocks."""
    from pagedserve.model.resolve import resolve
    from pagedserve.worker.simulated import SimulatedWorker

    def pool(**engine):
        config = sim_config(SIM_8B, tokenizer_dir, **engine)
        model = config.model.model_copy(update={"quantization": "fp8"})
        info = resolve(model, torch.device("cpu"), config.parallel, simulated=True)
        worker = SimulatedWorker(info, config.engine)
        planned = plan(config.model_copy(update={"model": model}),
                       gpu_memory_gb=GPUS["h200"].memory_bytes / 2**30)
        return worker, planned

    bf16_kv, planned_bf16 = pool()
    fp8_kv, planned_fp8 = pool(kv_cache_dtype="fp8")
    for worker, planned in ((bf16_kv, planned_bf16), (fp8_kv, planned_fp8)):
        assert worker.shape.weight_scheme.name == "FP8"
        assert worker.weight_bytes == planned.weight_bytes_per_rank
        assert worker.num_available_blocks(8192) == planned.num_blocks
    assert 0.56 < fp8_kv.weight_bytes / WEIGHTS_8B < 0.57  # the vocabulary stays bf16
    assert fp8_kv.block_bytes * 2 == bf16_kv.block_bytes == 16 * KV_8B
    assert fp8_kv.num_available_blocks(8192) in (2 * bf16_kv.num_available_blocks(8192),
                                                 2 * bf16_kv.num_available_blocks(8192) + 1)


def test_simulated_tokens_are_real_text_and_stop_strings_work(llm):
    prompt = {"prompt_token_ids": list(range(1000, 1100))}
    out, again = (llm.generate(prompt, SamplingParams(max_tokens=40, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0] for _ in range(2))
    assert len(out.token_ids) == 40 and out.finish_reason == "length"
    assert sum(ch.isalpha() for ch in out.text) > 40  # words, from the bundled text
    assert len(again.text) > 0 and again.token_ids != out.token_ids  # each request its own place
    word = out.text.split()[3]
    stopped = llm.generate(prompt, SamplingParams(max_tokens=40, stop=[word]),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == word
    assert word not in stopped.text
    assert llm.get_memory_stats()["free_blocks"] == llm.get_memory_stats()["total_blocks"]


def test_eos_only_when_asked(llm, tokenizer_dir):
    params = SamplingParams(max_tokens=30)
    out = llm.generate("Hello", params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 30
    ending = LLM(config=sim_config(SIM_8B, tokenizer_dir, simulator={"gpu": "h200",
                                                                      "eos_after": 7}))
    try:
        out = ending.generate("Hello", params, use_tqdm=False)[0].outputs[0]
        assert out.finish_reason == "stop" and len(out.token_ids) == 7
        assert out.token_ids[-1] in ending.engine.info.eos_token_ids
        stats = ending.get_memory_stats()
        assert stats["free_blocks"] == stats["total_blocks"]
    finally:
        ending.shutdown()


def test_logprobs_samples_and_beams(llm):
    out = llm.generate("Hello", SamplingParams(max_tokens=5, logprobs=3, n=2, seed=1),
                       use_tqdm=False)[0]
    assert len(out.outputs) == 2
    for choice in out.outputs:
        for token, entry in zip(choice.token_ids, choice.logprobs, strict=True):
            values = list(entry.values())
            assert next(iter(entry)) == token and 2 <= len(entry) <= 3  # sampled, top-3
            assert all(v < 0 for v in values) and values[1:] == sorted(values[1:], reverse=True)
    beams = llm.generate("Hello", SamplingParams(max_tokens=4, n=2, best_of=3,
                                                 use_beam_search=True, temperature=0.0),
                         use_tqdm=False)[0]
    assert len(beams.outputs) == 2 and all(len(o.token_ids) == 4 for o in beams.outputs)


def test_step_stats_add_up_to_the_roofline(llm):
    engine = llm.engine
    roofline = engine.executor.worker.roofline
    expected = []
    submit = engine.executor.submit

    def recording(step):
        expected.append(roofline.step_time(
            [StepShape(s.num_tokens, s.context_len, s.do_sample) for s in step.seqs]))
        return submit(step)

    engine.executor.submit = recording
    engine.reset_step_stats()
    try:
        prompts = [{"prompt_token_ids": [500 + i] * (64 + i)} for i in range(16)]
        llm.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)
    finally:
        engine.executor.submit = submit
    stats = llm.get_step_stats()
    assert set(stats) == {"steps", "device_s", "wall_s", "host_s"}
    assert stats["steps"] == len(expected) == 20
    assert stats["device_s"] == pytest.approx(sum(expected))
    # The engine waits for the device: its stepping takes at least the device's time.
    assert stats["wall_s"] >= stats["device_s"] * 0.99
    assert stats["host_s"] == pytest.approx(max(0.0, stats["wall_s"] - stats["device_s"]))


def test_four_simulated_ranks_under_ray(ray_cluster, tokenizer_dir):
    tp4 = LLM(config=sim_config(SIM_70B, tokenizer_dir))
    try:
        assert len(set(tp4.engine.worker_pids)) == 4
        prompts = [{"prompt_token_ids": list(range(300, 300 + 50 + i))} for i in range(4)]
        params = SamplingParams(max_tokens=12, ignore_eos=True)
        outs = tp4.generate(prompts, params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 12 for o in outs)
        stats = tp4.get_step_stats()
        assert stats["steps"] == 12 and stats["device_s"] > 0
        assert all(sum(ch.isalpha() for ch in o.outputs[0].text) > 5 for o in outs)
        memory = tp4.get_memory_stats()
        assert memory["free_blocks"] == memory["total_blocks"]
    finally:
        tp4.shutdown()


def test_the_simulated_config_serves_through_the_openai_api(serve_instance, tokenizer_dir):
    """What `pagedserve serve configs/llama-3-8b-h200-sim.yaml` runs, on Serve."""
    import openai
    from ray import serve

    from pagedserve.cluster.app import build

    config = sim_config(SIM_8B, tokenizer_dir)
    serve.run(build(config), name="pagedserve-sim", route_prefix="/sim")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{serve_instance.http}/sim/v1",
                               api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        assert model == "meta-llama/Meta-Llama-3-8B-Instruct"
        stream = client.completions.create(model=model, prompt="Once upon a time",
                                           max_tokens=24, stream=True,
                                           stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert chunks[-1].usage.completion_tokens == 24 and len(text) > 24
        # Another request reads another place of the text; any text has a space.
        whole = client.completions.create(model=model, prompt="Once upon a time", max_tokens=24,
                                          stop=[" "])
        assert whole.choices[0].finish_reason == "stop" and " " not in whole.choices[0].text
    finally:
        serve.delete("pagedserve-sim")


def test_a_constrained_token_is_the_texts_where_its_mask_allows_it_else_the_lowest_allowed(
        monkeypatch):
    """The simulated device's choice under a structured output's mask, for a whole batch
    at once, against the rule read one row at a time."""
    from pagedserve.worker import simulated

    def one_row(token: int, words: torch.Tensor) -> int:
        if (int(words[token // 32]) >> (token % 32)) & 1:
            return token
        nonzero = words.nonzero()
        if not len(nonzero):
            return token  # nothing allowed: the text's token (a bug upstream, not here)
        index = int(nonzero[0])
        word = int(words[index]) & 0xFFFFFFFF
        return index * 32 + (word & -word).bit_length() - 1

    monkeypatch.setattr(simulated, "_HEAD_WORDS", 2)  # the first words, then all of them
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    for _ in range(300):
        rows, width = 7, 5
        words = torch.randint(-2**31, 2**31, (rows, width), generator=generator).to(torch.int32)
        for row in range(rows):
            kind = rng.random()
            if kind < 0.3:
                words[row] = 0
            elif kind < 0.7:  # a band of allowed words, maybe past the first ones
                words[row, :rng.randrange(width)] = 0
                words[row, rng.randrange(width):] = 0
        tokens = [rng.randrange(width * 32) for _ in range(rows)]
        assert simulated._allowed(tokens, words) == [one_row(token, words[row])
                                                    for row, token in enumerate(tokens)]
