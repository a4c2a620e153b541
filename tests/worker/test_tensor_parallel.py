"""Tensor parallelism over Ray actors (gloo on CPU): TP=2 and TP=4 give the same
tokens as TP=1 and HF, through chunked prefill, prefix caching and preemption
by both recompute and swap; a dead worker fails `generate` instead of hanging it.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from support import REPO
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams
from pagedserve.config import parse
from pagedserve.scheduler.step import ScheduledSequence, StepInput
from pagedserve.testing import build_random_model
from pagedserve.worker.errors import WorkerFailedError

BLOCK_SIZE = 8
MAX_TOKENS = 12
# A GQA model with 8 KV heads (16 query heads), a vocabulary that 4 does not
# divide (the vocab-parallel layers pad) and biases (row-parallel ones must be
# added once, not once per rank).
MODEL = dict(arch="llama", vocab_size=510, hidden_size=128, num_attention_heads=16,
             num_key_value_heads=8, intermediate_size=256, num_hidden_layers=2,
             attention_bias=True, mlp_bias=True)
ENGINE = dict(block_size=BLOCK_SIZE, max_model_len=104, dtype="float32", device="cpu",
              # Below the longest prompt: prompts are computed in chunks.
              max_num_batched_tokens=32,
              # About one request fits: they preempt each other. Single sequences
              # are recomputed, n=2 groups are swapped (preemption_mode auto).
              num_gpu_blocks=14, swap_space=0.01)


def _prompts() -> list[list[int]]:
    """Long shared prefixes (prefix-cache hits), an exact repeat, and unrelated prompts."""
    rng = random.Random(3)
    system = [rng.randrange(6, 510) for _ in range(60)]
    suffixes = [[rng.randrange(6, 510) for _ in range(n)] for n in (3, 9, 17, 30)]
    # Ids on both sides of every rank's vocab range (510 rows: 255 per rank at
    # TP=2, 128 at TP=4) and the last id.
    boundaries = [127, 128, 255, 256, 383, 384, 509]
    other = boundaries + [rng.randrange(6, 510) for _ in range(34)]
    return [system + s for s in suffixes] + [system + suffixes[0], other, system[:20]]


NUM_GREEDY = 5  # the rest sample n=2 with a seed


def _params() -> list[SamplingParams]:
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    sampled = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=MAX_TOKENS,
                             ignore_eos=True)
    return [greedy] * NUM_GREEDY + [sampled] * (len(_prompts()) - NUM_GREEDY)


@pytest.fixture(scope="module")
def tp_model(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("tp") / "llama-gqa8", **MODEL)


@pytest.fixture(scope="module")
def hf_greedy(tp_model):
    model = AutoModelForCausalLM.from_pretrained(tp_model, dtype=torch.float32).eval()
    results = []
    for prompt in _prompts()[:NUM_GREEDY]:
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS,
                                 do_sample=False)
        results.append(out[0, len(prompt):].tolist())
    return results


def _tp_llm(model_dir, tp_size: int, **parallel) -> LLM:
    """TP over Ray actors of a quarter CPU each, so four fit the test cluster's two."""
    config = parse({
        "model": {"path": str(model_dir), "dtype": "float32",
                  "max_model_len": ENGINE["max_model_len"]},
        "engine": {k: v for k, v in ENGINE.items() if k not in ("max_model_len", "dtype")},
        "parallel": {"tensor_parallel_size": tp_size, "distributed_executor_backend": "ray",
                     "worker_cpus": 0.25, **parallel},
    })
    return LLM(config=config)


def _run(llm: LLM) -> list[list[list[int]]]:
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    outputs = llm.generate(prompts, _params(), use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outputs]


@pytest.fixture(scope="module")
def tp1_outputs(tp_model):
    llm = LLM(str(tp_model), **ENGINE)
    outputs = _run(llm)
    stats = llm.get_memory_stats()
    # The scenario exercises what it claims to.
    assert stats["num_preemptions"] > stats["num_swap_preemptions"] > 0
    assert stats["prefix_cache_hit_rate"] > 0.2
    return outputs


@pytest.mark.parametrize("tp_size, compiled", [(2, True), (2, False), (4, "auto")],
                         ids=["tp2-compiled-graph", "tp2-plain-calls", "tp4-auto"])
def test_tp_equals_tp1_and_hf(ray_cluster, tp_model, hf_greedy, tp1_outputs, tp_size, compiled):
    # Steps reach the ranks through a Ray compiled graph, or one ray.put and a call
    # per rank (what "auto" picks on CPU).
    llm = _tp_llm(tp_model, tp_size, ray_compiled_graph=compiled)
    try:
        outputs = _run(llm)
        stats = llm.get_memory_stats()
    finally:
        llm.shutdown()
    assert outputs == tp1_outputs
    assert [o[0] for o in outputs[:NUM_GREEDY]] == hf_greedy
    assert stats["num_swap_preemptions"] > 0 and stats["prefix_cache_hit_rate"] > 0.2
    assert stats["free_blocks"] == stats["total_blocks"] and stats["swapped_blocks"] == 0


def test_tp_size_must_divide_heads(tp_model):
    # Rejected while reading the model's config, before any worker starts.
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide the model's "
                                         "num_attention_heads=16"):
        LLM(str(tp_model), tensor_parallel_size=3, **ENGINE)
    with pytest.raises(ValueError, match="num_key_value_heads=8"):
        LLM(str(tp_model), tensor_parallel_size=16, **ENGINE)


def test_cluster_too_small_is_refused_at_once(ray_cluster, tp_model):
    # Four ranks of one CPU each on a two-CPU cluster: an error, not a wait.
    with pytest.raises(ValueError, match=r"needs 4 CPU \(1 per rank\) but the Ray cluster has 2"):
        LLM(str(tp_model), tensor_parallel_size=4, **ENGINE)


def test_local_backend_runs_one_rank_only(tp_model):
    with pytest.raises(ValueError, match="parallel.*distributed_executor_backend='local'"):
        LLM(str(tp_model), tensor_parallel_size=2, distributed_executor_backend="local", **ENGINE)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled-graph", "plain-calls"])
def test_killed_worker_fails_generate(ray_cluster, tp_model, compiled):
    llm = _tp_llm(tp_model, 2, ray_compiled_graph=compiled)
    executor = llm.engine.executor
    victim = executor.workers[1]
    steps = 0
    execute = executor.execute

    def counting_execute(step):
        nonlocal steps
        steps += 1
        return execute(step)

    executor.execute = counting_execute

    def kill_after_some_steps():
        while steps < 5:
            time.sleep(0.01)
        ray_cluster.kill(victim)

    killer = threading.Thread(target=kill_after_some_steps, daemon=True)
    killer.start()
    result: dict[str, BaseException] = {}

    def generate():
        try:
            params = SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True)
            llm.generate([{"prompt_token_ids": p} for p in _prompts()], params, use_tqdm=False)
        except BaseException as error:  # noqa: BLE001 - the test inspects it
            result["error"] = error

    runner = threading.Thread(target=generate, daemon=True)
    runner.start()
    runner.join(timeout=120)
    assert not runner.is_alive(), "generate hung after a worker died"
    error = result.get("error")
    assert isinstance(error, WorkerFailedError) and error.rank == 1
    assert "tensor-parallel worker rank 1 failed" in str(error)
    # Nothing is left behind, and the dead engine says so at once.
    stats = llm.get_memory_stats()
    assert stats["free_blocks"] == stats["total_blocks"] and stats["num_running"] == 0
    with pytest.raises(WorkerFailedError, match="rank 1"):
        llm.generate([{"prompt_token_ids": [7, 8, 9]}], use_tqdm=False)
    assert executor.workers == []  # every rank was stopped


@pytest.mark.parametrize("kill, blamed", [
    (True, r"tensor-parallel worker rank 1 failed in execute \(its actor died\)"),
    (False, r"tensor-parallel workers failed in execute \(RayChannelError: .*Channel closed"),
], ids=["rank-1-dead", "all-alive"])
def test_closed_graph_channel_blames_the_dead_rank(ray_cluster, tp_model, kill, blamed):
    """A rank's death can reach the driver first as the compiled graph's channel
    closing, with no actor named: the executor asks the ranks which one is gone,
    and blames none when all of them answer."""
    from ray.exceptions import RayChannelError

    llm = _tp_llm(tp_model, 2, ray_compiled_graph=True)
    executor = llm.engine.executor
    llm.generate([{"prompt_token_ids": [7, 8, 9]}], use_tqdm=False)  # compiles the graph
    if kill:
        ray_cluster.kill(executor.workers[1])

    class ClosedChannel:
        def execute(self, step):
            raise RayChannelError("Channel closed.")

        def teardown(self):
            pass

    executor._graph.teardown()
    executor._graph = ClosedChannel()
    with pytest.raises(WorkerFailedError, match=blamed):
        llm.generate([{"prompt_token_ids": [7, 8, 9]}], use_tqdm=False)
    stats = llm.get_memory_stats()
    assert stats["free_blocks"] == stats["total_blocks"] and executor.workers == []


def test_raising_worker_fails_the_step_and_names_the_error(ray_cluster, tp_model):
    llm = _tp_llm(tp_model, 2)
    # A block id past the pool's end: every rank raises while writing the KV cache.
    bad = ScheduledSequence(seq_id=0, token_ids=[5, 6, 7], start_pos=0, block_table=[10**6],
                            do_sample=True, sampling_params=SamplingParams(temperature=0.0))
    with pytest.raises(WorkerFailedError, match=r"tensor-parallel worker rank [01] failed in "
                                                r"execute \(\w+Error: "):
        llm.engine.executor.execute(StepInput(seqs=[bad]))
    assert llm.engine.executor.workers == []


def test_shipped_tp2_config_matches_tiny_cpu(ray_cluster):
    configs = REPO / "configs"
    prompts = [{"prompt_token_ids": list(range(6, 6 + n))} for n in (3, 40)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    single = LLM.from_config(str(configs / "tiny-cpu.yaml"))
    expected = [o.outputs[0].token_ids for o in single.generate(prompts, params, use_tqdm=False)]
    tp2 = LLM.from_config(str(configs / "tiny-cpu-tp2.yaml"))
    try:
        got = [o.outputs[0].token_ids for o in tp2.generate(prompts, params, use_tqdm=False)]
        # Same pool size per rank as tiny-cpu's single worker holds: twice the blocks.
        assert (tp2.get_memory_stats()["total_blocks"]
                == 2 * single.get_memory_stats()["total_blocks"])
    finally:
        tp2.shutdown()
    assert got == expected
