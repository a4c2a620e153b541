"""Speculative decoding: prompt lookup (engine.speculative, method "ngram") and a
draft model (method "draft_model").

Greedy requests give the target's own greedy tokens, token for token, under chunked
prefill, preemption by recompute and by swap, the prefix cache (a second run hits
the blocks the first one cached, which a key made from a refused draft would
poison), async scheduling and on the simulated GPU; every block comes back.
Requests the verifier cannot keep exact (logprobs, n > 1, penalties, seeded
sampling) decode plainly beside them and give what they give without
speculation. The sampled case's distribution is held to the target's in
tests/worker/test_spec_verify.py.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import user_cache
from support import REPO

from pagedserve import LLM, SamplingParams
from pagedserve.config import load, parse
from pagedserve.scheduler.ngram import PromptLookup
from pagedserve.testing import build_random_model

ENGINE = dict(device="cpu", dtype="float32", num_gpu_blocks=96, max_model_len=384, block_size=8)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1}
# Prompts that repeat themselves (prompt lookup finds matches) and one that does not.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11] * 6, [40 + i % 13 for i in range(50)], list(range(60, 100))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("speculative") / "llama", arch="llama")


@pytest.fixture(scope="module")
def plain(model_dir):
    return LLM(str(model_dir), **ENGINE)


@pytest.fixture(scope="module")
def small_draft(tmp_path_factory, model_dir):
    """A smaller random model with the target's tokenizer: its guesses are mostly wrong."""
    return build_random_model(tmp_path_factory.mktemp("speculative") / "draft", arch="llama",
                              seed=3, hidden_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1,
                              intermediate_size=64)


def draft(path) -> dict:
    return {"model": str(path), "num_speculative_tokens": 3}


def _tokens(llm: LLM, params=GREEDY, prompts=PROMPTS) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def _all_blocks_back(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.free_blocks == stats.total_blocks, "blocks leaked"


@pytest.mark.parametrize("engine", [
    {},
    {"max_num_batched_tokens": 24},  # prompts in chunks; drafts share the budget
    {"num_gpu_blocks": 24, "max_model_len": 128, "preemption_mode": "recompute"},
    {"num_gpu_blocks": 24, "max_model_len": 128, "preemption_mode": "swap"},
    {"async_scheduling": True},
    {"num_gpu_blocks": 24, "max_model_len": 128, "preemption_mode": "recompute",
     "async_scheduling": True},
    {"num_gpu_blocks": 24, "max_model_len": 128, "preemption_mode": "swap",
     "async_scheduling": True},
], ids=["default", "chunked", "recompute", "swap", "async", "async-recompute", "async-swap"])
def test_greedy_tokens_are_the_targets_own(model_dir, plain, engine):
    spec = LLM(str(model_dir), **{**ENGINE, **engine}, speculative_config=NGRAM)
    assert _tokens(spec) == _tokens(plain)
    stats = spec.get_spec_decode_stats()
    assert stats["draft_tokens"] > 0 and 0 < stats["accepted_tokens"] <= stats["draft_tokens"]
    assert stats["acceptance_rate"] == stats["accepted_tokens"] / stats["draft_tokens"]
    assert 1 < stats["mean_accepted_length"] <= 1 + NGRAM["num_speculative_tokens"]
    if "num_gpu_blocks" in engine:
        assert spec.engine.scheduler.num_preemptions > 0
    _all_blocks_back(spec)


@pytest.mark.parametrize("engine", [
    {},
    {"max_num_batched_tokens": 24},
    {"num_gpu_blocks": 24, "max_model_len": 128, "preemption_mode": "recompute"},
    {"num_gpu_blocks": 24, "max_model_len": 128, "preemption_mode": "swap",
     "async_scheduling": True},
], ids=["default", "chunked", "recompute", "async-swap"])
def test_a_draft_models_proposals_keep_the_targets_greedy_tokens(model_dir, plain, engine):
    """The target as its own draft: nearly every proposal is kept, and the draft's KV,
    computed beside the target's in the same blocks, survives chunking, recompute and
    swapping (a draft that read a stale cache would propose other tokens)."""
    spec = LLM(str(model_dir), **{**ENGINE, **engine}, speculative_config=draft(model_dir))
    assert _tokens(spec) == _tokens(plain)
    stats = spec.get_spec_decode_stats()
    assert stats["acceptance_rate"] > 0.95 and stats["mean_accepted_length"] > 3
    if "num_gpu_blocks" in engine:
        assert spec.engine.scheduler.num_preemptions > 0
    _all_blocks_back(spec)


def test_a_draft_model_catches_up_after_the_steps_it_sat_out(model_dir, plain):
    """With three requests running, more than disable_by_batch_size, every step decodes
    plainly and the draft computes nothing; once two have finished the last one
    speculates, and the draft first catches up with its prompt and 30 outputs. A
    draft cache with holes would propose other tokens than the target's."""
    spec = LLM(str(model_dir), **ENGINE, speculative_config={
        **draft(model_dir), "disable_by_batch_size": 1})
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
              for n in (30, 30, 60)]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    ours = [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)]
    assert ours == [o.outputs[0].token_ids for o in plain.generate(prompts, params,
                                                                   use_tqdm=False)]
    stats = spec.get_spec_decode_stats()
    assert stats["speculating_steps"] < stats["decode_steps"]
    # Two full runs of drafts at least (the policy stops where it measures that a
    # self-draft, as costly as the target, does not pay on the CPU).
    assert stats["acceptance_rate"] > 0.95 and stats["accepted_tokens"] >= 6, stats
    _all_blocks_back(spec)


def test_a_weak_draft_changes_no_token_and_its_sampled_requests_stop_in_place(
        model_dir, plain, small_draft):
    spec = LLM(str(model_dir), **ENGINE, speculative_config=draft(small_draft))
    assert _tokens(spec) == _tokens(plain)
    stats = spec.get_spec_decode_stats()
    assert 0 <= stats["accepted_tokens"] < stats["draft_tokens"]
    params = SamplingParams(temperature=0.8, top_k=20, max_tokens=40, ignore_eos=True)
    assert all(len(tokens) == 40 for tokens in _tokens(spec, params))
    # Each block holds both models' KV: fewer blocks fit the same memory.
    assert spec.engine.executor.block_bytes > plain.engine.executor.block_bytes
    _all_blocks_back(spec)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_tensor_parallel_ranks_verify_as_one(ray_cluster, model_dir, plain, method):
    """TP=2 on Ray: the drafts travel with the step to both ranks; rank 0 verifies. A
    draft model is split like the target, each rank running its shard's passes over its
    own blocks on the tokens rank 0 broadcasts: a rank fed other tokens would make the
    shared proposals wrong, and the self-draft's acceptance would drop."""
    speculative = NGRAM if method == "ngram" else draft(model_dir)
    config = parse({"model": {"path": str(model_dir), "dtype": "float32", "max_model_len": 384},
                    "engine": {"device": "cpu", "num_gpu_blocks": 96, "block_size": 8,
                               "speculative": speculative},
                    "parallel": {"tensor_parallel_size": 2, "distributed_executor_backend": "ray",
                                 "worker_cpus": 0.25}})
    tp2 = LLM(config=config)
    try:
        assert _tokens(tp2) == _tokens(plain)
        stats = tp2.get_spec_decode_stats()
        assert stats["accepted_tokens"] > 0
        if method == "draft_model":
            assert stats["acceptance_rate"] > 0.95, stats
        _all_blocks_back(tp2)
    finally:
        tp2.shutdown()


def test_cached_blocks_hold_verified_tokens_only(model_dir, plain):
    """The second run of the same prompts reuses the first run's cached blocks; a block
    keyed by a refused draft would serve the wrong K/V and change the tokens."""
    spec = LLM(str(model_dir), **ENGINE, speculative_config=NGRAM)
    first = _tokens(spec)
    hits_before = spec.engine.block_manager.prefix_hit_tokens
    prompts = [p + t[:30] for p, t in zip(PROMPTS, first, strict=True)]  # cached as outputs
    assert _tokens(spec, prompts=prompts) == _tokens(plain, prompts=prompts)
    assert spec.engine.block_manager.prefix_hit_tokens > hits_before
    _all_blocks_back(spec)


def test_requests_that_cannot_speculate_decode_plainly_beside_those_that_do(model_dir, plain):
    spec = LLM(str(model_dir), **ENGINE, speculative_config=NGRAM)
    cases = [SamplingParams(temperature=0.0, max_tokens=20, logprobs=2),
             SamplingParams(temperature=0.9, seed=7, max_tokens=20),
             SamplingParams(temperature=0.0, max_tokens=20, repetition_penalty=1.3),
             SamplingParams(temperature=0.8, n=2, seed=3, max_tokens=20),
             GREEDY]
    prompts = [{"prompt_token_ids": PROMPTS[i % len(PROMPTS)]} for i in range(len(cases))]
    ours = spec.generate(prompts, cases, use_tqdm=False)
    theirs = plain.generate(prompts, cases, use_tqdm=False)
    for a, b in zip(ours, theirs, strict=True):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    for mine, reference in zip(ours[0].outputs[0].logprobs, theirs[0].outputs[0].logprobs,
                               strict=True):  # other batches: float32 rounding apart
        assert mine.keys() == reference.keys()
        assert all(abs(mine[t] - reference[t]) < 1e-4 for t in mine)
    assert spec.get_spec_decode_stats()["draft_tokens"] > 0  # the greedy one speculated
    _all_blocks_back(spec)


def test_an_adapters_requests_speculate_and_verify_with_the_adapter(model_dir, tmp_path):
    """The drafts' rows go through the request's adapter like its own tokens, so the
    target that verifies them is the adapted model."""
    from pagedserve import LoRARequest
    from pagedserve.testing.lora import build_lora_adapter

    adapter = LoRARequest("a", 1, str(build_lora_adapter(model_dir, tmp_path / "a", 8,
                                                         ["q_proj", "v_proj"])))
    lora = dict(enable_lora=True, max_lora_rank=8, max_loras=1)
    spec = LLM(str(model_dir), **ENGINE, **lora, speculative_config=NGRAM)
    base = LLM(str(model_dir), **ENGINE, **lora)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    with_adapter = [o.outputs[0].token_ids
                    for o in spec.generate(prompts, GREEDY, lora_request=adapter, use_tqdm=False)]
    assert with_adapter == [o.outputs[0].token_ids for o in base.generate(
        prompts, GREEDY, lora_request=adapter, use_tqdm=False)]
    assert with_adapter != _tokens(base)  # the adapter changes the tokens
    assert spec.get_spec_decode_stats()["accepted_tokens"] > 0
    _all_blocks_back(spec)


def test_sampled_requests_speculate_and_stop_where_they_should(model_dir):
    spec = LLM(str(model_dir), **ENGINE, speculative_config=NGRAM)
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=40, ignore_eos=True)
    for tokens in _tokens(spec, params):
        assert len(tokens) == 40
    assert spec.get_spec_decode_stats()["draft_tokens"] > 0
    # A stop token among the kept drafts ends the output there.
    full = _tokens(spec)[0]
    stop = full[10]
    cut = spec.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(
        temperature=0.0, max_tokens=48, stop_token_ids=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.token_ids == full[:full.index(stop) + 1] and cut.finish_reason == "stop"
    _all_blocks_back(spec)


def test_the_simulated_gpu_speculates_on_its_text():
    """The simulated device's tokens follow its text from a place a seed picks; a prompt
    holding that stretch of text lets prompt lookup propose what the device keeps."""
    from pagedserve.worker.simulated import _spread

    config = load(REPO / "configs" / "llama-3-8b-h200-sim.yaml")
    engine = config.engine.model_dump()
    engine["speculative"] = {"method": "ngram", "num_speculative_tokens": 3}
    with user_cache():  # the embedded tokenizer's files, made once per machine
        spec = LLM(config=config.model_validate({**config.model_dump(), "engine": engine}))
        plain = LLM(config=config)
    text = plain.engine.executor.worker.text
    start = _spread(5, 0) % len(text)
    prompt = [text[(start + i) % len(text)] for i in range(40)]
    params = SamplingParams(temperature=0.0, seed=5, max_tokens=30, ignore_eos=True)
    a = plain.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
    b = spec.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
    assert a.token_ids == b.token_ids == prompt[:30]
    stats = spec.get_spec_decode_stats()
    assert stats["acceptance_rate"] > 0.9 and stats["mean_accepted_length"] > 3


def test_the_simulated_gpus_roofline_says_where_speculation_stops_paying():
    """Llama-3-8B on a simulated H200, 1,024-token contexts: at batch 1 and 32 a decode
    step reads 16 GB of weights for one token a sequence, and five drafts cost next to
    nothing; at 256 and 1,024 drafts make the step compute-bound, and only the first
    few, the likeliest kept, pay for their FLOPs."""
    from pagedserve.engine.speculation import speculation_policy
    from pagedserve.scheduler.speculation import SpecStats, SpeculationPolicy

    config = load(REPO / "configs" / "llama-3-8b-h200-sim.yaml")
    from pagedserve.model.resolve import resolve

    with user_cache():
        info = resolve(config.model, torch.device("cuda"), config.parallel, simulated=True)
    policy = speculation_policy(SpeculationPolicy(PromptLookup(5, 2, 4)), info, config.engine,
                                config.parallel)
    assert policy is not None and policy.cost is not None

    def length(batch: int, acceptance: float) -> int:
        return policy.best_length(batch, 1024, SpecStats(recent_acceptance=acceptance,
                                                         recent_coverage=1.0))

    assert length(1, 0.6) == length(32, 0.6) == 5
    assert length(256, 0.6) == 3 and length(1024, 0.6) == 2
    # Without a step-time model (a CPU) the policy measures one.
    cpu = config.engine.model_copy(update={"simulator": None})
    assert speculation_policy(SpeculationPolicy(PromptLookup(5, 2, 4)), info, cpu,
                              config.parallel).cost is None


def test_a_steps_host_work_is_the_engines_own_cpu_time():
    """The host work the policy weighs is the engine thread's CPU time in its steps, not
    what the thread does between them (here 30 ms of other work each time)."""
    config = load(REPO / "configs" / "llama-3-8b-h200-sim.yaml")
    engine = config.engine.model_dump()
    engine["speculative"] = {"method": "ngram", "num_speculative_tokens": 3}
    with user_cache():
        llm = LLM(config=config.model_validate({**config.model_dump(), "engine": engine}))
    core = llm.engine
    core.add_request("0", list(range(100, 140)), SamplingParams(max_tokens=24, ignore_eos=True))
    seen = []
    while core.has_unfinished_requests():
        core.step()
        seen.append(core.scheduler.spec_stats.host_per_seq)
        busy = time.thread_time() + 0.03
        while time.thread_time() < busy:
            pass
    measured = [host for host in seen if host is not None]
    assert len(measured) > 20 and max(measured) < 5e-3


def test_a_fresh_engine_at_a_large_batch_decodes_plainly_and_probes_once(monkeypatch):
    """256 sequences on the simulated H200, where a plain step's host work (pinned here
    at 60 us a sequence, 15 ms a step) is as long as the device's, and the model says
    plain: no step speculates while the prompts start; the first probe waits until the
    model's rates say it costs at most probe_share of the time; and that one probe of a
    few steps, planned with asynchronous scheduling, measures speculating against plain
    (slower here)."""
    from pagedserve.scheduler.scheduler import Scheduler
    from pagedserve.scheduler.speculation import SpecStats, SpeculationPolicy
    from pagedserve.worker.simulated import _spread

    monkeypatch.setattr(SpecStats, "observe_host",
                        lambda self, sequences, seconds: setattr(self, "host_per_seq", 60e-6))
    steps: list[tuple[bool, bool, int]] = []  # (speculated, started a prompt, sequences)
    take_in = Scheduler._spec_step_done

    def watched(self, step_input, step_output):
        steps.append((step_input.speculates, any(
            seq.num_tokens > 1 + len(seq.draft_token_ids or ()) for seq in step_input.seqs),
            len(step_input.seqs)))
        take_in(self, step_input, step_output)

    monkeypatch.setattr(Scheduler, "_spec_step_done", watched)
    waits: list[int] = []
    modelled_wait = SpeculationPolicy.modelled_wait

    def noted(self, decodes, context, stats):
        waits.append(modelled_wait(self, decodes, context, stats))
        return waits[-1]

    monkeypatch.setattr(SpeculationPolicy, "modelled_wait", noted)
    config = load(REPO / "configs" / "llama-3-8b-h200-sim.yaml")
    engine = config.engine.model_dump()
    engine["speculative"] = {"method": "ngram", "num_speculative_tokens": 8,
                             "prompt_lookup_min": 3, "prompt_lookup_max": 5}
    with user_cache():
        llm = LLM(config=config.model_validate({**config.model_dump(), "engine": engine}))
    assert llm.engine.async_scheduling
    text = llm.engine.executor.worker.text
    prompts = []
    for seed in range(256):  # each holding the stretch of text its reply copies, edited
        start = _spread(seed, 0) % len(text)
        prompts.append({"prompt_token_ids": [text[(start + i + 7919 * (i % 6 == seed % 6))
                                                   % len(text)] for i in range(96)]})
    params = [SamplingParams(temperature=0.0, seed=seed, max_tokens=160, ignore_eos=True)
              for seed in range(256)]
    llm.generate(prompts, params, use_tqdm=False)
    assert not any(speculates and starting for speculates, starting, _ in steps)
    # At 256 (the batch's tail, a few sequences, may speculate):
    speculated = [i for i, (speculates, _, seqs) in enumerate(steps) if speculates and seqs == 256]
    policy = llm.engine.scheduler.config.speculation
    assert speculated and speculated == list(range(speculated[0], speculated[-1] + 1))
    assert len(speculated) < policy.probe_len
    # It waited as long as the model said a probe affords, not probe_every steps.
    assert speculated[0] >= min(waits) > 2 * policy.probe_every
    stats = llm.engine.scheduler.spec_stats
    assert stats.rates.speculating_is_faster(256) is False
    assert stats.accepted_tokens > 0


@pytest.mark.parametrize("config, words", [
    ({"method": "eagle3", "num_speculative_tokens": 2}, "'eagle3' needs the path of its head"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs the path of its draft model"),
    ({"num_speculative_tokens": 2}, "give 'ngram', or a draft `model`"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
      "prompt_lookup_max": 2}, "must not exceed prompt_lookup_max"),
])
def test_what_is_not_run_is_refused_at_start_with_the_reason(model_dir, config, words):
    with pytest.raises(ValueError, match="engine.speculative") as raised:
        LLM(str(model_dir), **ENGINE, speculative_config=config)
    assert words in str(raised.value)


def test_a_draft_that_cannot_run_is_refused_at_start_with_the_reason(model_dir, tmp_path):
    other = build_random_model(tmp_path / "other-vocab", arch="llama", vocab_size=300)
    with pytest.raises(ValueError, match="vocabulary of 300 tokens and the target 512"):
        LLM(str(model_dir), **ENGINE, speculative_config=draft(other))
    windowed = build_random_model(tmp_path / "windowed", arch="mistral", sliding_window=16)
    with pytest.raises(ValueError, match="a target with a window in every layer runs 'ngram'"):
        LLM(str(windowed), **ENGINE, speculative_config=draft(windowed))


def test_a_draft_split_like_the_target_must_divide_like_it(model_dir, small_draft):
    """Under tensor parallelism a draft is split like the target: a draft with one KV
    head cannot be split over two ranks."""
    from pagedserve.config import config_from_fields
    from pagedserve.engine.speculation import draft_model
    from pagedserve.model.resolve import resolve

    config = config_from_fields(str(model_dir), {
        "device": "cpu", "tensor_parallel_size": 2, "distributed_executor_backend": "ray",
        "speculative_config": draft(small_draft)}, source="test")
    with pytest.raises(ValueError, match="engine.speculative.model: .*tensor_parallel_size=2 "
                                         "does not divide the model's num_key_value_heads=1"):
        draft_model(config, resolve(config.model, torch.device("cpu")))


def test_the_simulated_gpu_drafts_with_a_preset_shaped_model():
    """A Llama-3.2-1B-shaped draft beside Llama-3-8B on the simulated H200: its weights
    and KV take memory, its passes take time, and its tokens are the text's with the
    configured chance each (a run of 4 then keeps 0.7 + ... + 0.7^4 = 1.77 on average)."""
    sim = load(REPO / "configs" / "llama-3-8b-h200-sim.yaml")
    data = sim.model_dump()
    data["engine"]["speculative"] = {"model": "meta-llama/Llama-3.2-1B-Instruct",
                                     "num_speculative_tokens": 4}
    data["engine"]["simulator"]["draft_acceptance"] = 0.7
    with user_cache():
        spec, plain = LLM(config=parse(data)), LLM(config=sim)
    prompts = [{"prompt_token_ids": list(range(100, 140))}] * 8
    params = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    assert ([o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)])
    stats = spec.get_spec_decode_stats()
    assert 1.5 < stats["mean_accepted_length"] - 1 < 2.1, stats
    ours, theirs = spec.engine.executor.worker, plain.engine.executor.worker
    assert ours.block_bytes > theirs.block_bytes and ours.weight_bytes > theirs.weight_bytes
    _all_blocks_back(spec)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_structured_outputs_speculate_with_a_mask_on_every_row(model_dir, plain, method):
    """Drafts are cut where the grammar refuses them, and each verified row is masked by
    the grammar's state after the drafts before it: greedy constrained outputs are the
    plain engine's, sampled ones parse and validate."""
    pytest.importorskip("xgrammar")
    import json

    import jsonschema

    from pagedserve import StructuredOutputsParams

    schema = {"type": "object", "properties": {
        "items": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 12}},
        "required": ["items"], "additionalProperties": False}
    speculative = (NGRAM if method == "ngram" else draft(model_dir))
    spec = LLM(str(model_dir), **ENGINE, speculative_config=speculative)
    constrained = StructuredOutputsParams(json=schema)
    greedy = SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=constrained)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    ours = spec.generate(prompts, greedy, use_tqdm=False)
    assert ([o.outputs[0].token_ids for o in ours]
            == [o.outputs[0].token_ids for o in plain.generate(prompts, greedy, use_tqdm=False)])
    sampled = SamplingParams(temperature=0.8, max_tokens=60, structured_outputs=constrained)
    for output in spec.generate(prompts * 2, sampled, use_tqdm=False):
        if output.outputs[0].finish_reason == "stop":
            jsonschema.validate(json.loads(output.outputs[0].text), schema)
    if method == "ngram":  # the output repeats itself: drafts the grammar allows
        assert spec.get_spec_decode_stats()["accepted_tokens"] > 0
    # The draft model proposes without the grammar; on a random model it proposes
    # nothing the grammar allows, and the requests decode as they would plainly.
    _all_blocks_back(spec)
