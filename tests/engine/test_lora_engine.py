"""Multi-LoRA through the engine, against HF transformers + peft on the same files:
base requests and four adapters of different ranks and targets share every batch
with two device slots (so adapters are swapped in and out between steps), at TP=1
and TP=2 on Ray; the prefix cache never shares KV between adapters; bad adapters
are refused and leave nothing behind; an adapter in use is unloaded after its
requests end."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from pagedserve import LLM, AsyncLLMEngine, LoRARequest, SamplingParams
from pagedserve.config import parse
from pagedserve.errors import RequestError
from pagedserve.testing import build_random_model
from pagedserve.testing.lora import build_lora_adapter, peft_greedy

pytest.importorskip("peft")

MAX_TOKENS = 8
# A GQA base with biases, whose heads and MLP split over two ranks.
MODEL = dict(arch="llama", vocab_size=510, hidden_size=128, num_attention_heads=8,
             num_key_value_heads=4, intermediate_size=256, num_hidden_layers=2,
             attention_bias=True)
ADAPTERS = [  # (rank, targets): ranks 2..16, some parts of a fused layer only
    (4, ["q_proj", "v_proj"]),
    (8, ["q_proj", "k_proj", "o_proj", "down_proj"]),
    (2, ["gate_proj", "up_proj"]),
    (16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
]
ENGINE = dict(block_size=8, max_model_len=128, dtype="float32", device="cpu",
              max_num_batched_tokens=48, num_gpu_blocks=96, enable_lora=True,
              max_lora_rank=16, max_loras=2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("lora-base") / "llama", **MODEL)


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-adapters")
    return [LoRARequest(f"adapter{i}", i + 1,
                        str(build_lora_adapter(base, root / f"a{i}", rank, targets, seed=i)))
            for i, (rank, targets) in enumerate(ADAPTERS)]


def _workload(adapters) -> tuple[list[list[int]], list[LoRARequest | None]]:
    """Prompts of 3 to 60 tokens, one shared by several adapters, each adapter twice."""
    rng = random.Random(0)
    shared = [rng.randrange(6, 510) for _ in range(40)]
    prompts, loras = [], []
    for index, lora in enumerate([None, *adapters, None, *reversed(adapters)]):
        length = rng.randint(3, 60)
        prompts.append(shared if index % 3 == 0 else [rng.randrange(6, 510)
                                                      for _ in range(length)])
        loras.append(lora)
    return prompts, loras


@pytest.fixture(scope="module")
def expected(base, adapters):
    prompts, loras = _workload(adapters)
    oracle = {None: peft_greedy(base, None, prompts, MAX_TOKENS)}
    for lora in adapters:
        oracle[lora.lora_name] = peft_greedy(base, lora.lora_path, prompts, MAX_TOKENS)
    return [oracle[None if lora is None else lora.lora_name][i] for i, lora in enumerate(loras)]


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _generate(llm: LLM, prompts, loras, params=GREEDY):
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                           lora_request=loras, use_tqdm=False)
    return [[c.token_ids for c in out.outputs] for out in outputs]


def _assert_nothing_held(llm: LLM) -> None:
    core = llm.engine
    stats = llm.get_memory_stats()
    assert stats["free_blocks"] == stats["total_blocks"] and stats["swapped_blocks"] == 0
    slots = core.scheduler.adapters.slots
    assert all(slots.users(lora_id) == 0 for lora_id in slots.resident())


def test_mixed_batches_equal_peft_with_two_slots(base, adapters, expected):
    llm = LLM(str(base), **ENGINE)
    prompts, loras = _workload(adapters)
    assert [out[0] for out in _generate(llm, prompts, loras)] == expected
    slots = llm.engine.scheduler.adapters.slots
    assert slots.evictions >= 2  # four adapters through two slots
    _assert_nothing_held(llm)
    # One adapter for all prompts, as the seed's example passes it.
    alone = _generate(llm, prompts[:3], adapters[3])
    assert [out[0] for out in alone] == peft_greedy(base, adapters[3].lora_path, prompts[:3],
                                                    MAX_TOKENS)


def test_tensor_parallel_equals_peft(ray_cluster, base, adapters, expected):
    config = parse({
        "model": {"path": str(base), "dtype": "float32", "max_model_len": 128},
        "engine": {k: v for k, v in ENGINE.items()
                   if k in ("block_size", "device", "max_num_batched_tokens", "num_gpu_blocks")},
        "parallel": {"tensor_parallel_size": 2, "distributed_executor_backend": "ray",
                     "worker_cpus": 0.25},
        "lora": {"enable_lora": True, "max_lora_rank": 16, "max_loras": 2},
    })
    llm = LLM(config=config)
    try:
        prompts, loras = _workload(adapters)
        assert [out[0] for out in _generate(llm, prompts, loras)] == expected
        _assert_nothing_held(llm)
    finally:
        llm.shutdown()


def test_prefix_cache_is_keyed_by_adapter(base, adapters):
    llm = LLM(str(base), **ENGINE)
    prompt = list(range(10, 50))  # five full blocks

    def hits(lora) -> int:
        before = llm.get_memory_stats()["prefix_cache_hits"]
        _generate(llm, [prompt], lora)
        return llm.get_memory_stats()["prefix_cache_hits"] - before

    assert hits(adapters[0]) == 0
    assert hits(adapters[1]) == 0  # the same tokens under another adapter: other KV
    assert hits(None) == 0
    assert hits(adapters[0]) >= 32 and hits(None) >= 32  # each finds its own


def test_samples_beams_and_preemption_under_adapters(base, adapters):
    """n=2 samples (swapped under pressure), beams, and recomputed singles give the
    same tokens in a pool that forces preemption as in a roomy one."""
    rng = random.Random(5)
    prompts = [[rng.randrange(6, 510) for _ in range(rng.randint(20, 50))] for _ in range(6)]
    loras = [adapters[i % 4] if i % 3 else None for i in range(6)]
    params = [SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
              SamplingParams(n=2, best_of=2, use_beam_search=True, temperature=0.0,
                             max_tokens=12, ignore_eos=True)] * 2

    def run(**engine):
        llm = LLM(str(base), **{**ENGINE, **engine})
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                            lora_request=loras, use_tqdm=False)
        _assert_nothing_held(llm)
        return llm.get_memory_stats(), [[c.token_ids for c in o.outputs] for o in outs]

    _, roomy = run()
    tight_stats, tight = run(num_gpu_blocks=20, swap_space=0.01)
    assert tight_stats["num_preemptions"] > tight_stats["num_swap_preemptions"] > 0
    assert tight == roomy
    assert roomy[1][0] == peft_greedy(base, loras[1].lora_path, [prompts[1]], 24)[0]


def _broken_adapters(base, adapters, tiny_llama, root):
    """name -> (a LoRARequest that must be refused, a word of the error)."""
    over = build_lora_adapter(base, root / "over", 32, ["q_proj"])
    missing = root / "missing"
    missing.mkdir()
    (missing / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q"]}))
    other = build_lora_adapter(tiny_llama, root / "other-shape", 4, ["q_proj"])
    corrupt = build_lora_adapter(base, root / "corrupt", 4, ["q_proj"])
    (corrupt / "adapter_model.safetensors").write_bytes(b"not safetensors")
    return {"rank": (over, "exceeds max_lora_rank=16"),
            "missing": (missing, "adapter_model.safetensors"),
            "shape": (other, "shape"),
            "corrupt": (corrupt, "not a readable safetensors"),
            "dora": (build_lora_adapter(base, root / "dora", 4, ["q_proj"], use_dora=True),
                     "DoRA")}


def test_bad_adapters_are_refused_and_leave_nothing(base, adapters, tiny_llama, tmp_path):
    llm = LLM(str(base), **ENGINE)
    for index, (name, (path, words)) in enumerate(
            _broken_adapters(base, adapters, tiny_llama, tmp_path).items()):
        with pytest.raises(RequestError, match=words) as refused:
            _generate(llm, [[5, 6, 7]], LoRARequest(name, 100 + index, str(path)))
        assert refused.value.param == "lora_request"
        assert llm.engine.list_loras() == []  # nothing was registered
        _assert_nothing_held(llm)
    # The engine still serves, base and adapter alike.
    prompts, loras = _workload(adapters)
    assert _generate(llm, prompts[:2], loras[:2])
    with pytest.raises(RequestError, match="one id names one adapter"):
        _generate(llm, [[5, 6]], LoRARequest("renamed", adapters[0].lora_int_id,
                                             adapters[0].lora_path))
    with pytest.raises(RequestError, match="entries for 2 prompts"):
        _generate(llm, prompts[:2], [None])
    _assert_nothing_held(llm)


def test_lora_needs_enable_lora(base, adapters):
    llm = LLM(str(base), **{k: v for k, v in ENGINE.items()
                            if k not in ("enable_lora", "max_lora_rank", "max_loras")})
    with pytest.raises(RequestError, match="enable_lora=True"):
        _generate(llm, [[5, 6, 7]], adapters[0])
    with pytest.raises(ValueError, match="max_cpu_loras=1 must be at least max_loras=2"):
        LLM(str(base), **{**ENGINE, "max_cpu_loras": 1})


def test_async_engine_unloads_an_adapter_after_its_requests(base, adapters):
    engine = AsyncLLMEngine.from_config(parse({
        "model": {"path": str(base), "dtype": "float32", "max_model_len": 128},
        "engine": {"block_size": 8, "device": "cpu", "num_gpu_blocks": 96},
        "lora": {"enable_lora": True, "max_lora_rank": 16, "max_loras": 2},
    }))
    lora = adapters[1]
    prompt = [7, 8, 9, 10, 11]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)

    async def scenario():
        await engine.add_lora(lora)
        assert [r.lora_name for r in await engine.list_loras()] == [lora.lora_name]
        stream = engine.generate({"prompt_token_ids": prompt}, params, "r0", lora_request=lora)
        first = await stream.__anext__()
        assert not first.finished
        assert await engine.remove_lora(lora.lora_int_id) is False  # in use: goes later
        with pytest.raises(RequestError, match="being unloaded"):
            async for _ in engine.generate({"prompt_token_ids": prompt}, params, "r1",
                                           lora_request=lora):
                pass
        final = first
        async for output in stream:
            final = output
        assert final.finished
        assert await engine.list_loras() == []
        return final.outputs[0].token_ids

    try:
        tokens = asyncio.run(scenario())
        assert tokens == peft_greedy(base, lora.lora_path, [prompt], 40)[0]
        core = engine.core
        assert core.scheduler.adapters.slots.resident() == []
        assert core.get_memory_stats()["free_blocks"] == core.get_memory_stats()["total_blocks"]
    finally:
        engine.shutdown()


def test_lora_fields_reach_every_entry_point(base, adapters):
    from pagedserve import AsyncEngineArgs

    args = AsyncEngineArgs(model=str(base), enable_lora=True, max_loras=3, max_cpu_loras=5)
    assert (args.config.lora.max_loras, args.config.lora.cpu_capacity) == (3, 5)
    with pytest.raises(ValueError, match="lora.max_lora_rank"):
        parse({"model": {"path": str(base)}, "lora": {"enable_lora": True, "max_lora_rank": 0}})
    with pytest.raises(ValueError, match="need lora.enable_lora"):
        parse({"model": {"path": str(base)}, "lora": {"modules": [{"name": "a", "path": "/a"}]}})
    with pytest.raises(ValueError, match=r"names \['a'\] are given more than once"):
        parse({"model": {"path": str(base)}, "lora": {"enable_lora": True, "modules": [
            {"name": "a", "path": "/a"}, {"name": "a", "path": "/b"}]}})
    # Served modules are registered when the engine is built, ids 1, 2, ... in order.
    llm = LLM(config=parse({
        "model": {"path": str(base), "dtype": "float32", "max_model_len": 128},
        "engine": {"device": "cpu", "block_size": 8, "num_gpu_blocks": 64},
        "lora": {"enable_lora": True, "modules": [{"name": "x", "path": adapters[2].lora_path}]},
    }))
    assert llm.engine.list_loras() == [LoRARequest("x", 1, adapters[2].lora_path)]


def test_chat_takes_a_lora_request(base, adapters):
    llm = LLM(str(base), **ENGINE)
    messages = [{"role": "user", "content": "hello there"}]
    ids = llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)
    chat = llm.chat(messages, GREEDY, use_tqdm=False, lora_request=adapters[0])
    assert chat[0].outputs[0].token_ids == peft_greedy(base, adapters[0].lora_path, [list(ids)],
                                                       MAX_TOKENS)[0]


def test_a_moe_model_takes_adapters_on_its_attention_only(tmp_path):
    """Qwen3-MoE (layer 1 of 3 dense): an adapter of q and v equals peft. peft's adapter
    of down_proj adapts the experts' stacked weights (its target_parameters), and one
    with a dense down_proj's tensors at a sparse layer: both are refused, saying why, and
    nothing is held."""
    from safetensors.torch import load_file, save_file

    base = build_random_model(tmp_path / "moe", arch="qwen3_moe", vocab_size=510,
                              num_hidden_layers=3, mlp_only_layers=[1])
    path = build_lora_adapter(base, tmp_path / "a", 4, ["q_proj", "v_proj"])
    llm = LLM(str(base), **ENGINE)
    prompts = [[7, 8, 9, 10], [11] * 20]
    lora = LoRARequest("moe", 1, str(path))
    assert [out[0] for out in _generate(llm, prompts, [lora, lora])] == peft_greedy(
        base, path, prompts, MAX_TOKENS)
    experts = build_lora_adapter(base, tmp_path / "e", 4, ["down_proj"])
    with pytest.raises(RequestError, match=r"target_parameters \['down_proj'\] \(adapters of "
                                           "parameters, such as a mixture of experts'"):
        _generate(llm, prompts[:1], LoRARequest("experts", 2, str(experts)))
    tensors = load_file(path / "adapter_model.safetensors")
    q = "base_model.model.model.layers.2.self_attn.q_proj.lora_{}.weight"
    for which in "AB":  # q's tensors (of a fitting shape for q; not for down) at sparse layer 2
        tensors[q.format(which).replace("self_attn.q_proj", "mlp.down_proj")] = tensors[
            q.format(which)].clone()
    config = json.loads((path / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "v_proj", "down_proj"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(RequestError, match="adapts the MLP of layer 2, which is a mixture of "
                                           "experts"):
        _generate(llm, prompts[:1], LoRARequest("sparse", 3, str(path)))
    _assert_nothing_held(llm)
