"""Chaos on one LLMServer: a random mix of clients that leave, aborts, parallel
sampling, beam search and long prompts, on a KV pool small enough that the
scheduler must swap and recompute; in one run also under three LoRA adapters
sharing two device slots, and in another with speculative decoding (prompt
lookup: drafts refused, trimmed, and dropped with aborts and preemptions).
Afterwards nothing is held (no block, no slot) and every request that ran to
the end returned what it returns alone, without speculation.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from support import REPO

from pagedserve import LLM, SamplingParams
from pagedserve.cluster.channel import crosses_as_deltas
from pagedserve.cluster.server import LLMServer
from pagedserve.config import load, parse
from pagedserve.engine.output_kinds import Accumulator

CONFIG = REPO / "configs" / "tiny-cpu.yaml"
VOCAB = range(6, 500)  # the tiny model's ordinary tokens


def _config(lora: dict | None = None, speculative: dict | None = None):
    data = load(CONFIG).model_dump()
    if lora is not None:
        data["lora"] = lora
    data["engine"]["speculative"] = speculative
    # 64 blocks of 16 tokens: a handful of long requests fill it.
    data["model"]["max_model_len"] = 1024
    data["engine"].update(num_gpu_blocks=64, swap_space=0.05, max_num_seqs=8,
                          max_num_batched_tokens=256)
    data["parallel"].update(distributed_executor_backend="local")
    return parse(data)


def _workload(seed: int, count: int, adapters=(), repeating: bool = False) -> list[dict]:
    """`repeating`: prompts that repeat a short stretch, which prompt lookup matches
    and a random model tends to go on repeating."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        kind = rng.choice(["greedy", "long", "long", "sampled_n", "sampled_n", "beam"])
        length = rng.randint(300, 600) if kind == "long" else rng.randint(4, 60)
        stretch = [rng.choice(VOCAB) for _ in range(rng.randint(3, 12) if repeating else length)]
        prompt = (stretch * length)[:length]
        max_tokens = rng.randint(8, 96)
        if kind in ("greedy", "long"):
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        elif kind == "sampled_n":  # seeded: the same tokens in any batch
            params = SamplingParams(n=rng.randint(2, 3), temperature=0.8, seed=i,
                                    max_tokens=max_tokens, ignore_eos=True)
        else:
            params = SamplingParams(n=2, best_of=rng.randint(2, 3), use_beam_search=True,
                                    temperature=0.0, max_tokens=rng.randint(8, 24),
                                    ignore_eos=True)
        fate = rng.choices(["finish", "leave", "cancel"], weights=[6, 2, 2])[0]
        lora = rng.choice([None, *adapters]) if adapters else None
        requests.append(dict(id=f"r{i}", prompt=prompt, params=params, fate=fate, lora=lora,
                             after=rng.randint(0, 6), delay=rng.uniform(0.0, 0.05)))
    return requests


async def _client(server: LLMServer, request: dict):
    """Run one request as its fate says; its final output if it finished."""
    await asyncio.sleep(request["delay"])
    stream = server.generate(request["id"], request["prompt"], request["params"],
                             lora=request["lora"])
    # The replica sends deltas (cumulative when best_of > n); added up as the ingress does.
    total = Accumulator(request["prompt"]) if crosses_as_deltas(request["params"]) else None
    seen, final = 0, None
    try:
        async for output in stream:
            seen += 1
            final = total.add(output) if total is not None else output
            if request["fate"] == "leave" and seen > request["after"]:
                return None  # the client disconnects; closing the stream aborts it
    finally:
        await stream.aclose()
    return final


async def _run(server: LLMServer, requests: list[dict]):
    tasks = [asyncio.create_task(_client(server, r)) for r in requests]
    rng = random.Random(1)
    for request, task in zip(requests, tasks, strict=True):
        if request["fate"] == "cancel":  # the caller's task is cancelled (Serve's abort)
            asyncio.get_running_loop().call_later(rng.uniform(0.0, 1.0), task.cancel)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for _ in range(500):  # aborts land at the next step boundary
        stats = await server.stats()
        if stats["num_running"] == stats["num_waiting"] == stats["num_swapped"] == 0:
            break
        await asyncio.sleep(0.01)
    return results, stats


def _tokens(output) -> list[tuple[int, ...]]:
    return [tuple(completion.token_ids) for completion in output.outputs]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    pytest.importorskip("peft")
    from pagedserve import LoRARequest
    from pagedserve.testing import cached_random_model
    from pagedserve.testing.lora import build_lora_adapter

    spec = load(CONFIG).model.random_init
    base = cached_random_model(spec.name, arch=spec.arch, seed=spec.seed,
                               **spec.config_overrides)
    root = tmp_path_factory.mktemp("chaos-adapters")
    targets = [["q_proj", "v_proj"], ["o_proj", "down_proj"], ["gate_proj", "up_proj", "k_proj"]]
    return [LoRARequest(f"a{i}", i + 1, str(build_lora_adapter(base, root / str(i), 4 * (i + 1),
                                                                target, seed=i)))
            for i, target in enumerate(targets)]


NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}


@pytest.mark.parametrize("seed, lora, speculative", [(0, False, None), (1, False, NGRAM),
                                                     (2, True, None)],
                         ids=["seed0", "seed1-ngram", "seed2-lora"])
def test_chaos_leaks_nothing_and_finished_requests_match_running_alone(seed, lora, speculative,
                                                                      adapters):
    used = adapters if lora else ()
    lora_config = ({"enable_lora": True, "max_lora_rank": 16, "max_loras": 2}
                   if lora else None)
    config = _config(lora_config, speculative)
    requests = _workload(seed, 60, used, repeating=speculative is not None)
    server = LLMServer(config)
    try:
        results, stats = asyncio.run(_run(server, requests))
        engine = server.engine.core  # the EngineCore under the async engine
        assert not engine.has_unfinished_requests()
        bm = engine.block_manager
        # Every block is free (cached prefixes count as free: evictable); the swap pool is empty.
        assert stats["num_running"] == stats["num_waiting"] == stats["num_swapped"] == 0
        assert stats["free_blocks"] == stats["total_blocks"], stats
        assert bm.num_allocated_blocks == 0 and bm.num_swapped_blocks == 0
        assert stats["num_preemptions"] > 0, stats
        # Whether a swap happens depends on which groups run together, which the clients'
        # timing decides; with two adapter slots gating admission the LoRA run may not
        # swap on a loaded machine. tests/engine/test_lora_engine.py swaps under LoRA
        # deterministically.
        assert lora or stats["num_swap_preemptions"] > 0, stats
        slots = engine.scheduler.adapters.slots
        if lora:  # every slot idle again, and the adapters did take turns in them
            assert all(slots.users(lora_id) == 0 for lora_id in slots.resident())
            assert slots.evictions > 0 and stats["lora_running"] == stats["lora_waiting"] == {}
        if speculative:  # drafts were made, some kept and some refused
            spec = engine.get_spec_decode_stats()
            assert 0 < spec["accepted_tokens"] < spec["draft_tokens"], spec
    finally:
        server.shutdown()
    finished = [(r, out) for r, out in zip(requests, results, strict=True)
                if r["fate"] == "finish" or (r["fate"] == "cancel" and out is not None
                                             and not isinstance(out, BaseException))]
    assert all(out is not None and out.finished for _, out in finished)
    assert len(finished) >= 25  # most of them: the comparison below means something
    # Each finished request, alone on a fresh engine of the same shape (not speculating).
    alone = LLM(config=_config(lora_config))
    for request, output in finished:
        reference = alone.generate([{"prompt_token_ids": request["prompt"]}],
                                   request["params"], use_tqdm=False,
                                   lora_request=request["lora"])[0]
        assert _tokens(output) == _tokens(reference), request["id"]
