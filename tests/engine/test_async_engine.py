"""AsyncLLMEngine: vLLM's async API, in process and without Ray.

Concurrent streams equal HF greedy, cumulative outputs grow, DELTA outputs add
up to them, and leaving or aborting frees every block.
"""

from __future__ import annotations

import asyncio
import sys
from itertools import pairwise

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve import AsyncEngineArgs, AsyncLLMEngine, RequestOutputKind, SamplingParams

PROMPTS = [[7 + i, 40 + 3 * i, 100 + i, 9, 17 + i] + list(range(200, 200 + i)) for i in range(8)]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(model_dirs):
    return model_dirs("llama-gqa")


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(
        model=str(model_dir), max_model_len=128, device="cpu", dtype="float32",
        num_gpu_blocks=64, block_size=8))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def hf_greedy(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [model.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS,
                               do_sample=False)[0, len(p):].tolist() for p in PROMPTS]


async def _collect(engine, prompt, params, request_id):
    return [out async for out in engine.generate(prompt, params, request_id)]


def _greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, **kwargs)


async def _until_free(engine) -> None:
    for _ in range(200):
        stats = await engine.get_memory_stats()
        if stats["free_blocks"] == stats["total_blocks"] and stats["num_running"] == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"blocks still held: {await engine.get_memory_stats()}")


def test_eight_concurrent_streams_equal_hf_and_grow(engine, hf_greedy):
    async def run():
        return await asyncio.gather(*(
            _collect(engine, {"prompt_token_ids": p}, _greedy(), f"s{i}")
            for i, p in enumerate(PROMPTS)))

    streams = asyncio.run(run())
    for stream, expected in zip(streams, hf_greedy, strict=True):
        assert stream[-1].finished and stream[-1].outputs[0].token_ids == expected
        for before, after in pairwise(stream):  # each output extends the last
            old, new = before.outputs[0], after.outputs[0]
            assert new.token_ids[:len(old.token_ids)] == old.token_ids
            assert new.text.startswith(old.text)
    assert max(len(s) for s in streams) > 1  # they streamed, step by step
    asyncio.run(_until_free(engine))


def test_delta_outputs_add_up_to_the_cumulative_result(engine):
    prompt = "The quick brown fox"
    params = dict(temperature=0.8, seed=7, max_tokens=MAX_TOKENS, logprobs=1, stop=["zz"])

    async def run():
        whole = await _collect(engine, prompt, SamplingParams(**params), "whole")
        deltas = await _collect(engine, prompt, SamplingParams(
            output_kind=RequestOutputKind.DELTA, **params), "delta")
        final = await _collect(engine, prompt, SamplingParams(
            output_kind=RequestOutputKind.FINAL_ONLY, **params), "final")
        return whole[-1], deltas, final

    whole, deltas, final = asyncio.run(run())
    expected = whole.outputs[0]
    news = [c for d in deltas for c in d.outputs]
    assert len(deltas) > 1
    assert "".join(c.text for c in news) == expected.text
    assert [t for c in news for t in c.token_ids] == expected.token_ids
    # (The second run reads the first's prompt from the prefix cache: float noise only.)
    entries = [e for c in news for e in c.logprobs]
    assert [list(e) for e in entries] == [list(e) for e in expected.logprobs]
    for entry, reference in zip(entries, expected.logprobs, strict=True):
        assert list(entry.values()) == pytest.approx(list(reference.values()), abs=1e-5)
    assert news[-1].finish_reason == expected.finish_reason and deltas[-1].finished
    assert len(final) == 1 and final[0].finished
    assert (final[0].outputs[0].text, final[0].outputs[0].token_ids) == (expected.text,
                                                                         expected.token_ids)


def test_a_consumer_that_leaves_and_an_abort_free_every_block(engine):
    async def leave_after_two():
        outputs = engine.generate({"prompt_token_ids": PROMPTS[0]},
                                  SamplingParams(max_tokens=100, ignore_eos=True), "leaver")
        seen = []
        async for output in outputs:
            seen.append(output)
            if len(seen) == 2:
                break
        await outputs.aclose()
        await _until_free(engine)
        return seen

    async def abort_midway():
        outputs = engine.generate({"prompt_token_ids": PROMPTS[1]},
                                  SamplingParams(max_tokens=100, ignore_eos=True), "aborted")
        seen = [await outputs.__anext__()]
        await engine.abort("aborted")
        seen += [output async for output in outputs]  # the generator ends
        await _until_free(engine)
        return seen

    assert len(asyncio.run(leave_after_two())) == 2
    aborted = asyncio.run(abort_midway())
    assert aborted[-1].finished and aborted[-1].outputs[0].finish_reason == "abort"
    assert len(aborted[-1].outputs[0].token_ids) < 100
    asyncio.run(engine.abort("no-such-request"))  # a no-op
    asyncio.run(_until_free(engine))


def test_a_cancelled_consumer_aborts_its_request(engine):
    async def run():
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate({"prompt_token_ids": PROMPTS[2]},
                                           SamplingParams(max_tokens=100, ignore_eos=True),
                                           "cancelled"):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()  # cancelled while it waits for its next output
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _until_free(engine)

    asyncio.run(run())


def test_outputs_handed_over_add_up_to_the_stream_and_leaving_still_aborts(engine):
    """With on_output the generator yields the first output and ends with the request;
    the rest reach on_output, the same outputs in the same order as a plain stream."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    prompt = {"prompt_token_ids": PROMPTS[3]}

    async def handed_over():
        later = []
        yielded = [o async for o in engine.generate(prompt, params, "handed",
                                                    on_output=later.append)]
        return yielded, later

    async def left_early():
        later = []
        outputs = engine.generate({"prompt_token_ids": PROMPTS[4]},
                                  SamplingParams(max_tokens=100, ignore_eos=True),
                                  "handed-leaver", on_output=later.append)
        await outputs.__anext__()
        while len(later) < 2:
            await asyncio.sleep(0.01)
        await outputs.aclose()  # the client left: its request is aborted
        await _until_free(engine)
        return later

    async def failing():
        def fail(output):
            raise RuntimeError("the outbox is gone")

        outputs = engine.generate({"prompt_token_ids": PROMPTS[5]},
                                  SamplingParams(max_tokens=100, ignore_eos=True),
                                  "handed-failing", on_output=fail)
        await outputs.__anext__()
        with pytest.raises(RuntimeError, match="the outbox is gone"):
            await outputs.__anext__()
        await _until_free(engine)

    plain = asyncio.run(_collect(engine, prompt, params, "plain"))
    yielded, later = asyncio.run(handed_over())
    assert len(yielded) == 1 and not yielded[0].finished
    assert later and later[-1].finished and not any(o.finished for o in later[:-1])
    tokens = [t for o in yielded + later for t in o.outputs[0].token_ids]
    assert tokens == [t for o in plain for t in o.outputs[0].token_ids]
    assert len(asyncio.run(left_early())) < 100
    asyncio.run(failing())


def test_refusals_raise_at_the_first_iteration(engine):
    async def first(prompt, params, request_id="bad"):
        return await engine.generate(prompt, params, request_id).__anext__()

    with pytest.raises(ValueError, match="max_model_len=128") as info:
        asyncio.run(first({"prompt_token_ids": [5] * 200}, SamplingParams()))
    assert info.value.param == "prompt_token_ids"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        asyncio.run(first({"prompt_token_ids": [10**6]}, SamplingParams()))
    with pytest.raises(ValueError, match="DELTA needs best_of equal to n=1"):
        SamplingParams(best_of=2, output_kind=RequestOutputKind.DELTA)
    assert asyncio.run(engine.get_tokenizer()) is not None
    asyncio.run(engine.check_health())


def test_runs_without_ray(model_dir):
    """The in-process engine imports and runs with Ray, FastAPI and gRPC blocked."""
    import subprocess

    probe = f"""
import asyncio, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "fastapi", "grpc", "starlette", "uvicorn"):
            raise ImportError(f"{{name}} is blocked")
sys.meta_path.insert(0, Block())
from pagedserve import AsyncEngineArgs, AsyncLLMEngine, SamplingParams
engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model={str(model_dir)!r},
    max_model_len=64, device="cpu", num_gpu_blocks=16))
async def run():
    return [o async for o in engine.generate("hello", SamplingParams(max_tokens=3), "1")]
print(len(asyncio.run(run())[-1].outputs[0].token_ids))
engine.shutdown()
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "3"


def test_engine_args_take_every_config_field_by_name(model_dir):
    args = AsyncEngineArgs(model=str(model_dir), placement_strategy="SPREAD", worker_cpus=0.5,
                           cpu_threads=1, max_model_len=64)
    assert args.config.parallel.placement_strategy == "SPREAD"
    assert args.config.parallel.worker_cpus == 0.5 and args.config.engine.cpu_threads == 1
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_lenn'"):
        AsyncEngineArgs(model=str(model_dir), max_lenn=3)


def test_speculating_streams_equal_hf_and_report_their_drafts(model_dir, hf_greedy):
    """AsyncEngineArgs takes vLLM's speculative_config; streams of a speculating engine
    give HF's greedy tokens, several tokens a step, and the drafts are counted."""
    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(
        model=str(model_dir), max_model_len=128, device="cpu", dtype="float32",
        num_gpu_blocks=64, block_size=8,
        speculative_config={"model": str(model_dir), "num_speculative_tokens": 3}))
    try:
        async def run():
            streams = await asyncio.gather(*(
                _collect(engine, {"prompt_token_ids": p}, _greedy(), f"s{i}")
                for i, p in enumerate(PROMPTS)))
            return streams, await engine.get_spec_decode_stats()

        streams, stats = asyncio.run(run())
        for stream, expected in zip(streams, hf_greedy, strict=True):
            assert stream[-1].outputs[0].token_ids == expected
            assert len(stream) < MAX_TOKENS  # steps that gave more than one token
        assert stats["acceptance_rate"] > 0.9 and stats["draft_tokens"] > 0
        asyncio.run(_until_free(engine))
    finally:
        engine.shutdown()
