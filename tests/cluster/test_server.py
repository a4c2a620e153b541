"""LLMServer without Ray Serve: the step thread, per-request streams, aborts and coalescing."""

from __future__ import annotations

import asyncio

import pytest
from support import REPO

from pagedserve import SamplingParams
from pagedserve.cluster.channel import crosses_as_deltas
from pagedserve.cluster.server import LLMServer
from pagedserve.cluster.streams import Stream
from pagedserve.config import load, parse
from pagedserve.errors import EngineOverloadedError

CONFIG = REPO / "configs" / "tiny-cpu.yaml"


def _server(**serving) -> LLMServer:
    data = load(CONFIG).model_dump()
    data["serving"].update(serving)
    return LLMServer(parse(data))


async def _collect(server: LLMServer, request_id: str, params: SamplingParams):
    return [output async for output in server.generate(request_id, [5, 6, 7], params)]


def _tokens(outputs) -> list[int]:
    """A request's tokens: the replica sends deltas, so its messages add up to them."""
    return [token for output in outputs for choice in output.outputs
            for token in choice.token_ids]


def test_concurrent_requests_stream_and_finish():
    server = _server()

    async def run():
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        results = await asyncio.gather(*(_collect(server, f"r{i}", params) for i in range(4)))
        stats = await server.stats()
        return results, stats

    try:
        results, stats = asyncio.run(run())
    finally:
        server.shutdown()
    for outputs in results:
        assert outputs[-1].finished and len(_tokens(outputs)) == 6
        assert not any(o.finished for o in outputs[:-1])
        # Deltas: at most the step's news in each message, never the prompt's ids.
        assert all(len(o.outputs[0].token_ids) <= 2 for o in outputs if o.outputs)
        assert all(o.prompt_token_ids is None for o in outputs)
    assert len({tuple(_tokens(o)) for o in results}) == 1  # same prompt, greedy
    assert stats["num_running"] == 0 and stats["free_blocks"] == stats["total_blocks"]


def test_cumulative_outputs_get_the_prompt_back_at_the_ingress():
    """best_of > n is sent cumulative, without the prompt's ids; the ingress's
    stream puts its own back in every output."""
    server = _server()
    params = SamplingParams(n=1, best_of=2, max_tokens=6, ignore_eos=True, temperature=0.8,
                            seed=1)

    async def run():
        replica = server.generate("r", [5, 6, 7], params)
        first = await replica.__anext__()
        sent = [first.prompt_token_ids]

        async def rest():
            async for output in replica:
                sent.append(output.prompt_token_ids)  # as it crossed: the stream fills it in
                yield output

        outputs = [o async for o in Stream(first, rest(), [5, 6, 7], crosses_as_deltas(params))]
        return sent, outputs

    try:
        sent, outputs = asyncio.run(run())
    finally:
        server.shutdown()
    assert len(sent) > 1 and all(ids is None for ids in sent)
    assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 6
    assert all(o.prompt_token_ids == [5, 6, 7] for o in outputs)


def test_leaving_early_aborts_and_frees_blocks():
    server = _server()

    async def run():
        stream = server.generate("long", [5, 6, 7], SamplingParams(max_tokens=1000,
                                                                  ignore_eos=True))
        await stream.__anext__()
        await stream.aclose()  # the client is gone
        for _ in range(200):
            stats = await server.stats()
            if stats["num_running"] == 0:
                return stats
            await asyncio.sleep(0.01)
        return stats

    try:
        stats = asyncio.run(run())
    finally:
        server.shutdown()
    assert stats["num_running"] == 0 and stats["free_blocks"] == stats["total_blocks"]


def test_stream_interval_coalesces_updates():
    server = _server(stream_interval_s=0.2)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    try:
        outputs = asyncio.run(_collect(server, "r", params))
    finally:
        server.shutdown()
    # 40 steps arrive in fewer, larger updates; nothing is lost.
    assert len(outputs) < 40 and len(_tokens(outputs)) == 40


def test_bad_request_and_full_queue_are_refused():
    data = load(CONFIG).model_dump()
    data["engine"]["max_num_seqs"] = 1
    data["serving"]["max_waiting_requests"] = 1
    server = LLMServer(parse(data))
    long = SamplingParams(max_tokens=1000, ignore_eos=True)

    async def run():
        with pytest.raises(ValueError, match="max_model_len=2048"):
            await server.generate("big", [5] * 3000, SamplingParams()).__anext__()
        first = asyncio.create_task(_collect(server, "a", long))
        second = asyncio.create_task(_collect(server, "b", long))
        for _ in range(500):  # one runs, one waits
            stats = await server.stats()
            if stats["num_running"] == 1 and stats["num_waiting"] == 1:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(EngineOverloadedError, match="1 requests are waiting, the limit is 1"):
            await server.generate("c", [5], SamplingParams()).__anext__()
        for task in (first, second):
            task.cancel()
        await asyncio.gather(first, second, return_exceptions=True)

    try:
        asyncio.run(run())
    finally:
        server.shutdown()


def test_ranks_started_for_a_model_that_fails_to_load_are_stopped(ray_cluster):
    """The replica starts its ranks before it resolves the model; when that fails, they
    go, and so do their CPUs."""
    import time

    data = load(CONFIG).model_dump()
    data["model"].update(random_init=None, path="/nonexistent/model")
    data["parallel"].update(distributed_executor_backend="ray", worker_cpus=0.5)
    free = ray_cluster.available_resources().get("CPU", 0)
    with pytest.raises(Exception, match="/nonexistent/model"):
        LLMServer(parse(data))
    deadline = time.monotonic() + 60
    while ray_cluster.available_resources().get("CPU", 0) < free and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_cluster.available_resources().get("CPU", 0) == free
