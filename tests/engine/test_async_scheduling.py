"""Asynchronous scheduling: step N+1 planned while step N runs changes no output.

The same requests run with `async_scheduling` off and on (a CPU worker on its
device thread): greedy equals HF, and seeded sampling, stop strings, parallel
samples, penalties, beams, prefix-cache hits and preemption under a small
pool all give the same tokens. A stop found one step late emits no token and
keeps no block; an abort while steps are in flight frees every block.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams

PROMPTS = [[7 + i, 40 + 3 * i, 100 + i, 9, 17 + i] + list(range(200, 200 + 3 * i))
           for i in range(10)]


@pytest.fixture(scope="module")
def model_dir(model_dirs):
    return model_dirs("llama-gqa")


def engine(model_dir, async_scheduling: bool, **fields) -> LLM:
    options = dict(max_model_len=128, device="cpu", dtype="float32", num_gpu_blocks=48,
                   block_size=4, max_num_seqs=6, max_num_batched_tokens=48)
    options.update(fields)
    return LLM(str(model_dir), async_scheduling=async_scheduling, **options)


@pytest.fixture(scope="module")
def engines(model_dir):
    pair = {mode: engine(model_dir, mode) for mode in (False, True)}
    yield pair
    for llm in pair.values():
        llm.shutdown()


def run(llm: LLM, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    stats = llm.get_memory_stats()
    assert stats["free_blocks"] == stats["total_blocks"], stats
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs]
            for o in outs]


def test_greedy_equals_hf_with_steps_overlapped(engines, model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = [model.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False)[
            0, len(p):].tolist() for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outs = engines[True].generate([{"prompt_token_ids": p} for p in PROMPTS], params,
                                  use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert engines[True].engine.async_scheduling


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8, seed=3, max_tokens=20),
    SamplingParams(temperature=0.0, max_tokens=24, stop=["e", "a "]),
    SamplingParams(temperature=1.0, seed=5, n=2, best_of=3, max_tokens=10),
    SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5,
                   max_tokens=12),
    SamplingParams(temperature=0.0, use_beam_search=True, n=2, best_of=3, max_tokens=8),
    SamplingParams(temperature=0.7, seed=11, max_tokens=16, logprobs=2),
], ids=["seeded", "stop-strings", "parallel-samples", "penalties", "beams", "logprobs"])
def test_outputs_equal_the_synchronous_engine(engines, params):
    """Small pool and budget: requests are chunked, preempted and share prefix blocks."""
    prompts = PROMPTS + [PROMPTS[-1][:12] + [5, 6]]  # a shared prefix
    assert run(engines[True], prompts, params) == run(engines[False], prompts, params)


def test_preemption_by_swap_and_recompute_changes_nothing(model_dir):
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    results = {}
    for mode in (False, True):
        llm = engine(model_dir, mode, num_gpu_blocks=36, max_num_seqs=8,
                     preemption_mode="swap")
        try:
            results[mode] = run(llm, PROMPTS[:8], params)
            assert llm.get_memory_stats()["num_preemptions"] > 0
        finally:
            llm.shutdown()
    assert results[True] == results[False]


def test_a_stop_found_one_step_late_emits_nothing_and_keeps_no_block(engines):
    """Each sequence's next step is already in flight when its stop token arrives."""
    llm = engines[True]
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    first = llm.generate({"prompt_token_ids": PROMPTS[0]}, free, use_tqdm=False)[0].outputs[0]
    stop_at = first.token_ids[4]
    steps = []
    submit = llm.engine.executor.submit

    def recording(step):
        steps.append(step)
        return submit(step)

    llm.engine.executor.submit = recording
    try:
        out = llm.generate({"prompt_token_ids": PROMPTS[0]},
                           SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                          stop_token_ids=[stop_at]),
                           use_tqdm=False)[0].outputs[0]
    finally:
        llm.engine.executor.submit = submit
    assert out.token_ids == first.token_ids[:first.token_ids.index(stop_at) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    # One more step was planned for it with the stop token still unknown (in flight).
    assert len(steps) == len(out.token_ids) + 1
    last = steps[-1].seqs[0]
    assert last.token_ids == [] and last.last_token_in_flight
    stats = llm.get_memory_stats()
    assert stats["free_blocks"] == stats["total_blocks"]


def test_an_abort_with_steps_in_flight_frees_every_block(engines):
    core = engines[True].engine
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    for index, prompt in enumerate(PROMPTS[:4]):
        core.add_request(f"abort-{index}", prompt, params)
    for _ in range(4):
        core.step()
    assert core._in_flight  # a step is running while the requests go
    for index in range(4):
        core.abort_request(f"abort-{index}")
    while core.has_unfinished_requests():
        assert core.step() == []  # the steps in flight return nothing for aborted requests
    stats = core.get_memory_stats()
    assert stats["free_blocks"] == stats["total_blocks"] and stats["num_running"] == 0


def _run_steps(llm: LLM, prompts, params, max_steps: int = 2000) -> list:
    """The requests stepped to the end, or an assertion (not a hang) if they never finish."""
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    finals = {}
    for _ in range(max_steps):
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
        if not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests(), (
        f"unfinished after {max_steps} steps: {[g.request_id for g in engine.scheduler.waiting]} "
        f"waiting, {engine.block_manager.num_free_blocks} blocks free")
    return [[c.token_ids for c in finals[str(i)].outputs] for i in range(len(prompts))]


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
@pytest.mark.parametrize("params, num_blocks", [
    (SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=20, ignore_eos=True), 20),
    (SamplingParams(temperature=0.0, use_beam_search=True, n=2, best_of=3, max_tokens=20,
                    ignore_eos=True), 24),
], ids=["n2", "beams"])
def test_several_sequences_preempted_under_a_tight_pool(model_dir, preemption_mode, params,
                                                        num_blocks):
    """Requests of several sequences in a pool that holds few at once. A request is
    preempted while its prompt step is in flight (its samples are dropped and drawn
    again, or forked on the CPU pool). One recomputed with its sequences apart reuses
    their cached prompt once, so it fits again, and recomputed beams whose only token
    left is their last compute it together. The same tokens with and without async
    scheduling, and every block free."""
    results = {}
    for mode in (False, True):
        llm = engine(model_dir, mode, max_model_len=64, num_gpu_blocks=num_blocks,
                     max_num_seqs=8, preemption_mode=preemption_mode)
        try:
            results[mode] = _run_steps(llm, PROMPTS[:8], params)
            stats = llm.get_memory_stats()
            assert stats["num_preemptions"] > 0
            assert stats["free_blocks"] == stats["total_blocks"], stats
        finally:
            llm.shutdown()
    assert results[True] == results[False]
    assert all(len(tokens) == 20 for outputs in results[True] for tokens in outputs)


def test_the_decode_fast_path_plans_what_the_full_plan_does(model_dir, monkeypatch):
    """With steps in flight, a decoding sequence scheduled in a few reads
    (plan.py's schedule_decode) gets the step the full plan gives it: the token in
    flight as its input, its last one dropped at max_tokens, penalties waiting for the
    step's outcome, preemption under a small pool. Every step is the same, and so is
    every token."""
    from pagedserve.scheduler import scheduler as scheduler_module
    from pagedserve.scheduler.scheduler import Scheduler

    requests = [(PROMPTS[i], SamplingParams(temperature=0.0, max_tokens=6 + 3 * i,
                                            ignore_eos=True)) for i in range(6)]
    requests += [(PROMPTS[6], SamplingParams(temperature=0.0, max_tokens=12,
                                             frequency_penalty=0.5, ignore_eos=True)),
                 (PROMPTS[7], SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=10,
                                             ignore_eos=True))]
    schedule, fast_path = Scheduler.schedule, scheduler_module.schedule_decode
    taken: list[bool] = []

    def planned(fast: bool) -> tuple[list, list]:
        steps = []

        def recorded(self):
            step = schedule(self)
            steps.append([(s.seq_id, s.token_ids, s.start_pos, list(s.block_table),
                           s.do_sample, s.last_token_in_flight, s.output_index)
                          for s in step.seqs])
            return step

        def counted(*args):
            taken.append(fast_path(*args))
            return taken[-1]

        with monkeypatch.context() as patch:
            patch.setattr(Scheduler, "schedule", recorded)
            patch.setattr(scheduler_module, "schedule_decode", counted if fast else
                          lambda *args: False)
            llm = engine(model_dir, True, max_model_len=64, num_gpu_blocks=24, max_num_seqs=8)
            try:
                outputs = run(llm, [prompt for prompt, _ in requests],
                              [params for _, params in requests])
                assert llm.get_memory_stats()["num_preemptions"] > 0
            finally:
                llm.shutdown()
        return steps, outputs

    assert planned(True) == planned(False)
    assert sum(taken) > 50 and not all(taken)
