"""Structured outputs in the engine: every kind of constraint holds on what is
generated, greedy and sampled, beside unconstrained requests, across parallel
samples, preemption and async scheduling; what cannot be served is refused before
anything is queued.

Oracles: `jsonschema` for schemas, `re.fullmatch` for regexes, membership for
choices, and an xgrammar matcher walked along the text for grammars. Random
models write random text, so only the constraint makes these outputs valid.
"""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from pagedserve import LLM, AsyncEngineArgs, AsyncLLMEngine, SamplingParams
from pagedserve import StructuredOutputsParams as Structured
from pagedserve.errors import RequestError
from pagedserve.testing import build_random_model

pytest.importorskip("xgrammar")

ENGINE = dict(device="cpu", dtype="float32", num_gpu_blocks=64, max_model_len=256)
SCHEMA = {"type": "object",
          "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["ok", "size", "count"], "additionalProperties": False}
REGEX = r"[a-c]{3}-[0-9]{1,2}"
CHOICES = ["red", "green", "blue"]
GRAMMAR = 'root ::= "(" item ("," item)* ")"\nitem ::= "x" | "y" | root'
PROMPTS = [[5, 6, 7], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("structured") / "llama", arch="llama")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), **ENGINE)


def _grammar_accepts(llm: LLM, grammar: str, text: str) -> bool:
    import xgrammar as xgr

    tokenizer = llm.get_tokenizer()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=llm.engine.info.vocab_size)
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_grammar(grammar))
    return matcher.accept_string(text) and matcher.is_completed()


def _valid(llm: LLM, structured: Structured, text: str) -> bool:
    if structured.kind == "json":
        try:
            jsonschema.validate(json.loads(text), json.loads(structured.json))
        except (ValueError, jsonschema.ValidationError):
            return False
        return True
    if structured.kind == "json_object":
        try:
            return isinstance(json.loads(text), dict)
        except ValueError:
            return False
    if structured.kind == "regex":
        return re.fullmatch(structured.regex, text) is not None
    if structured.kind == "choice":
        return text in structured.choice
    return _grammar_accepts(llm, structured.grammar, text)


KINDS = [Structured(json=SCHEMA), Structured(json_object=True), Structured(regex=REGEX),
         Structured(choice=CHOICES), Structured(grammar=GRAMMAR)]


@pytest.mark.parametrize("structured", KINDS, ids=lambda s: s.kind)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_each_kind_holds_greedy_and_sampled(llm, structured, temperature):
    if structured.kind == "json_object" and temperature:
        pytest.skip("any JSON object: sampled, a random model may write one key for ever")
    params = SamplingParams(temperature=temperature, seed=7, max_tokens=120,
                            structured_outputs=structured)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    for output in outputs:
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", completion
        assert _valid(llm, structured, completion.text), completion.text
    # Unconstrained, the same random model writes text that fits none of them.
    free = llm.generate([{"prompt_token_ids": PROMPTS[0]}],
                        SamplingParams(temperature=temperature, seed=7, max_tokens=20),
                        use_tqdm=False)[0].outputs[0].text
    assert not _valid(llm, structured, free)


def test_unconstrained_neighbours_give_the_tokens_they_give_alone(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    alone = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS], greedy, use_tqdm=False)]
    constrained = SamplingParams(temperature=0.0, max_tokens=60,
                                 structured_outputs=Structured(json=SCHEMA))
    mixed = llm.generate([{"prompt_token_ids": PROMPTS[0]}, {"prompt_token_ids": PROMPTS[1]},
                          {"prompt_token_ids": PROMPTS[0]}],
                         [greedy, constrained, greedy], use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone[0] == mixed[2].outputs[0].token_ids
    assert _valid(llm, Structured(json=SCHEMA), mixed[1].outputs[0].text)


def test_each_parallel_sample_keeps_its_own_place_in_the_grammar(llm):
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=60,
                            structured_outputs=Structured(regex=REGEX))
    completions = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params,
                               use_tqdm=False)[0].outputs
    texts = [c.text for c in completions]
    assert len(texts) == 4 and all(re.fullmatch(REGEX, t) for t in texts), texts
    assert len(set(texts)) > 1  # the samples went their own ways


@pytest.mark.parametrize("preemption_mode, async_scheduling",
                         [("recompute", False), ("swap", False), ("recompute", True),
                          ("swap", True)])
def test_preempted_requests_come_back_where_their_grammar_was(model_dir, preemption_mode,
                                                              async_scheduling):
    """A pool of 12 blocks of 16 for 6 requests of ~100 tokens: requests are preempted
    and resumed; each output still validates, and every block comes back."""
    llm = LLM(str(model_dir), **{**ENGINE, "num_gpu_blocks": 12, "max_model_len": 192,
                                 "preemption_mode": preemption_mode,
                                 "async_scheduling": async_scheduling})
    schema = {"type": "array", "items": {"enum": ["alpha", "beta", "gamma"]},
              "minItems": 12, "maxItems": 12}
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=150,
                            structured_outputs=Structured(json=schema))
    outputs = llm.generate([{"prompt_token_ids": [9 + i] * 20} for i in range(6)], params,
                           use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for output in outputs:
        assert output.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(output.outputs[0].text), schema)
    engine_stats = llm.engine.stats()
    assert engine_stats.free_blocks == engine_stats.total_blocks, "blocks leaked"


def test_async_scheduling_fills_masks_once_the_token_in_flight_is_in(model_dir, monkeypatch):
    """Constrained sequences plan their next step while the one before runs; its mask
    is filled once that step's tokens are in (the sampler waits for it). The tokens
    are those of the engine without async scheduling, seeded or greedy, constrained
    or not."""
    from pagedserve.worker.token_masks import PendingBitmask

    filled_late = []
    set_ready = PendingBitmask.set_ready
    monkeypatch.setattr(PendingBitmask, "set_ready",
                        lambda self: (filled_late.append(self), set_ready(self))[1])
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=80,
                             structured_outputs=Structured(json=SCHEMA)) for s in range(3)]
    params += [SamplingParams(temperature=0.0, max_tokens=30),
               SamplingParams(temperature=0.0, max_tokens=40,
                              structured_outputs=Structured(regex=REGEX))]
    prompts = [{"prompt_token_ids": PROMPTS[i % 2]} for i in range(5)]
    runs = {}
    for async_scheduling in (False, True):
        llm = LLM(str(model_dir), **ENGINE, async_scheduling=async_scheduling)
        assert llm.engine.scheduler.config.late_masks is async_scheduling
        runs[async_scheduling] = [o.outputs[0] for o in llm.generate(prompts, params,
                                                                      use_tqdm=False)]
        stats = llm.engine.stats()
        assert stats.free_blocks == stats.total_blocks
    assert [c.token_ids for c in runs[True]] == [c.token_ids for c in runs[False]]
    assert len(filled_late) > 20  # the constrained decode steps after the first
    for completion in runs[True][:3]:
        assert completion.finish_reason == "stop"
        jsonschema.validate(json.loads(completion.text), SCHEMA)
    assert re.fullmatch(REGEX, runs[True][4].text)


def test_a_step_waiting_for_its_mask_is_released_when_the_engine_stops(model_dir):
    """A step sent with a late mask that is never filled (the engine failed or stopped)
    ends with an error instead of holding the device for ever."""
    from pagedserve.worker.token_masks import MaskCancelled, PendingBitmask

    llm = LLM(str(model_dir), **ENGINE, async_scheduling=True)
    engine = llm.engine
    engine.add_request("r", PROMPTS[0], SamplingParams(
        max_tokens=50, structured_outputs=Structured(json=SCHEMA)))
    for _ in range(3):
        engine.step()
    assert len(engine._in_flight) == 1
    late = engine._schedule()  # planned while a step runs: its mask waits for that step
    assert isinstance(late.token_bitmask, PendingBitmask)
    pending = engine.executor.submit(late)
    engine._in_flight.append((late, pending))
    engine.shutdown()
    with pytest.raises(MaskCancelled):
        pending.result(timeout=30)


def test_what_cannot_be_served_is_refused_before_it_is_queued(model_dir, llm):
    with pytest.raises(RequestError, match=r"structured_outputs=.*: not supported with "
                                           r"use_beam_search=True"):
        SamplingParams(use_beam_search=True, n=2, structured_outputs=Structured(regex="a"))
    with pytest.raises(RequestError, match="exactly one of json, regex"):
        Structured(regex="a", choice=["b"])
    with pytest.raises(RequestError, match=r"structured_outputs.json is not valid JSON"):
        Structured(json="{not json")
    with pytest.raises(RequestError, match="structured_outputs.regex does not compile"):
        llm.generate([{"prompt_token_ids": [1, 2]}],
                     SamplingParams(structured_outputs=Structured(regex="(unclosed")),
                     use_tqdm=False)
    small = LLM(str(model_dir), **ENGINE, max_spec_bytes=64)
    with pytest.raises(RequestError, match=r"is \d+ bytes, past the limit of 64 "
                                           r"\(structured_outputs.max_spec_bytes"):
        small.generate([{"prompt_token_ids": [1, 2]}],
                       SamplingParams(structured_outputs=Structured(json=SCHEMA)),
                       use_tqdm=False)
    assert not llm.engine.has_unfinished_requests() and not small.engine.has_unfinished_requests()


def test_the_async_engine_compiles_off_its_loop_and_fails_only_the_bad_request(model_dir):
    async def main():
        engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=str(model_dir), **ENGINE))
        try:
            async def run(request_id, structured):
                params = SamplingParams(temperature=0.0, max_tokens=60,
                                        structured_outputs=structured)
                final = None
                async for output in engine.generate({"prompt_token_ids": PROMPTS[0]}, params,
                                                    request_id):
                    final = output
                return final.outputs[0].text

            results = await asyncio.gather(
                run("good", Structured(json=SCHEMA)),
                run("bad", Structured(grammar="root ::= missing")),
                run("plain", None), return_exceptions=True)
            return results
        finally:
            engine.shutdown()

    good, bad, plain = asyncio.run(main())
    jsonschema.validate(json.loads(good), SCHEMA)
    assert isinstance(bad, RequestError) and bad.param == "structured_outputs.grammar"
    assert isinstance(plain, str)


def test_tensor_parallel_ranks_sample_the_constrained_text_of_one_rank(ray_cluster, model_dir,
                                                                      llm):
    """The step's bitmask travels with it to every rank; rank 0 applies it."""
    from pagedserve.config import parse

    params = [SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=s)
              for s in (Structured(json=SCHEMA), Structured(regex=REGEX))]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    expected = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    config = parse({"model": {"path": str(model_dir), "dtype": "float32", "max_model_len": 256},
                    "engine": {"device": "cpu", "num_gpu_blocks": 64},
                    "parallel": {"tensor_parallel_size": 2, "distributed_executor_backend": "ray",
                                 "worker_cpus": 0.25}})
    tp2 = LLM(config=config)
    try:
        assert [o.outputs[0].text for o in tp2.generate(prompts, params, use_tqdm=False)
                ] == expected
    finally:
        tp2.shutdown()


def test_a_lora_request_is_constrained_under_its_adapter(model_dir, tmp_path):
    from pagedserve import LoRARequest
    from pagedserve.testing.lora import build_lora_adapter

    adapter = build_lora_adapter(model_dir, tmp_path / "adapter", 8, ["q_proj", "v_proj"])
    llm = LLM(str(model_dir), **ENGINE, enable_lora=True, max_lora_rank=8)
    params = SamplingParams(temperature=0.0, max_tokens=60,
                            structured_outputs=Structured(json=SCHEMA))
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    adapted = llm.generate(prompts, params, use_tqdm=False,
                           lora_request=LoRARequest("a", 1, str(adapter)))
    base = llm.generate(prompts, params, use_tqdm=False)
    for output in adapted + base:
        jsonschema.validate(json.loads(output.outputs[0].text), SCHEMA)
    free = SamplingParams(temperature=0.0, max_tokens=12)
    assert (llm.generate(prompts, free, use_tqdm=False, lora_request=LoRARequest(
        "a", 1, str(adapter)))[0].outputs[0].token_ids
        != llm.generate(prompts, free, use_tqdm=False)[0].outputs[0].token_ids)
