"""Where the first token's time goes: one client's requests through the serving path,
stage by stage, against the same requests offline.

The app runs as `pagedserve serve` runs it (direct ingress, on a local Ray cluster),
on the simulated GPU of `--config`. Every Ray worker process loads `_install_stamps`
(Ray's `worker_process_setup_hook`): it wraps the functions at the stage boundaries
so that each writes the time (CLOCK_MONOTONIC, one clock for every process on the
machine) to a file of its process. Nothing in pagedserve is changed for it. One
client sends `--requests` streaming completions one after another (prompts of
`--prompt-len` random tokens, 16 new tokens, a new prompt each time so the prefix
cache never hits), and each request's stamps are the ones between its send and its
first token's bytes. The stages, in order:

    client sends ─> route       HTTP in: uvicorn, Serve's direct ingress, FastAPI
    route ─> parsed             the body read and parsed (OpenAIIngress._read,
                                RequestIntake.accept)
    parsed ─> submitted         prompt ids, sampling params (RequestIntake.start)
    submitted ─> replica        the Serve call: routing, transport, the replica
                                taking it (LLMServer.generate)
    replica ─> engine           the replica's checks, the engine taking the request
    engine ─> first token       the engine: scheduling and the prefill's device time
    first token ─> yielded      the step thread handing the output to the replica's loop
    yielded ─> ingress          the first output back through Serve
    ingress ─> first write      the response started, the first chunk made
    first write ─> client       the chunk written, and read by the client

The stamps cost a few microseconds each. The same prompts then run through an
offline `LLM` one at a time: served minus offline time to first token is what
serving adds (the issue's target: <= 5 ms at one client).

    python benchmarks/first_token.py [--config configs/llama-3-8b-h200-sim.yaml]
                                     [--requests 60] [--prompt-len 512]
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from gpu_rate import _serving, cpu_model
from served_load import free_ports

from pagedserve import LLM, SamplingParams
from pagedserve.config import Config, load

STAMPS_ENV = "PAGEDSERVE_BENCH_STAMPS"  # the folder the stamps go to
STAGES = ("route", "parsed", "submitted", "replica", "engine", "first token", "yielded",
          "ingress", "first write")
MAX_TOKENS = 16


def _install_stamps() -> None:
    """Ray's worker_process_setup_hook, pickled by value (this is __main__): wrap the
    stage boundaries of this process's serving classes to stamp the time."""
    import functools
    import os
    import time

    folder = os.environ.get(STAMPS_ENV)  # a global of __main__: pickled with the hook
    if not folder:
        return
    fd = os.open(os.path.join(folder, f"{os.getpid()}.txt"),
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def stamp(stage: str, at: float | None = None) -> None:
        os.write(fd, f"{time.monotonic() if at is None else at:.6f} {stage}\n".encode())

    from pagedserve.cluster import ingress, intake, server, streams

    def before(stage: str, method):
        @functools.wraps(method)
        async def wrapped(*args, **kwargs):
            stamp(stage)
            return await method(*args, **kwargs)
        return wrapped

    ingress.OpenAIIngress._read = before("route", ingress.OpenAIIngress._read)
    intake.RequestIntake.accept = before("parsed", intake.RequestIntake.accept)
    start = intake.RequestIntake.start

    @functools.wraps(start)
    async def started(*args, **kwargs):
        stamp("submitted")
        stream = await start(*args, **kwargs)
        stamp("ingress")
        return stream

    intake.RequestIntake.start = started
    generate = server.LLMServer.generate

    @functools.wraps(generate)
    async def generated(*args, **kwargs):
        stamp("replica")
        first = True
        async for output in generate(*args, **kwargs):
            if first:
                first = False
                stamp("engine", output.metrics.arrival_time)  # monotonic, as the stamps
                stamp("first token", output.metrics.first_token_time)
                stamp("yielded")
            yield output

    server.LLMServer.generate = generated
    respond = streams.EventStream.stream_response

    @functools.wraps(respond)
    async def responded(self, send):
        first = True

        async def sent(message):
            nonlocal first
            if first and message["type"] == "http.response.body":
                first = False
                stamp("first write")  # before: the client may read the bytes before
            await send(message)       # this coroutine runs again
        await respond(self, sent)

    streams.EventStream.stream_response = responded


def _client(port: int, model: str, prompts: list[list[int]]) -> list[tuple[float, float]]:
    """Each prompt streamed in turn on one connection: (sent, first token's bytes)."""
    connection = http.client.HTTPConnection("127.0.0.1", port)
    times = []
    for prompt in prompts:
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS,
                           "ignore_eos": True, "stream": True})
        sent = time.monotonic()
        connection.request("POST", "/v1/completions", body,
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        first = None
        for line in response:
            if first is None and line.startswith(b"data: {"):
                first = time.monotonic()
        if response.status != 200 or first is None:
            raise SystemExit(f"request failed: {response.status}")
        times.append((sent, first))
        time.sleep(0.02)  # the engine idle again, as for a lone client
    return times


def served(config: Config, prompts: list[list[int]], warmup: list[list[int]]) -> dict:
    """Each request's stages, in milliseconds, and its time to first token."""
    from pagedserve.model.embedded import served_model_name

    first = free_ports(2)
    config = config.model_copy(update={"serving": config.serving.model_copy(
        update={"port": first, "proxy_port": first + 1, "direct_ingress": True})})
    folder = tempfile.mkdtemp(prefix="first_token_")
    os.environ[STAMPS_ENV] = folder
    with _serving(config, runtime_env={"worker_process_setup_hook": _install_stamps}):
        model = served_model_name(config)
        _client(first, model, warmup)
        for name in os.listdir(folder):  # the warm-up's stamps
            os.truncate(os.path.join(folder, name), 0)
        times = _client(first, model, prompts)
    stamps = sorted((float(at), stage) for name in os.listdir(folder)
                    for at, stage in (line.split(" ", 1) for line in
                                      Path(folder, name).read_text().splitlines()))
    rows = []
    for sent, received in times:
        seen: dict[str, float] = {}
        for at, stage in stamps:
            if sent <= at <= received:
                seen.setdefault(stage, at)
        missing = [stage for stage in STAGES if stage not in seen]
        if missing:
            raise SystemExit(f"no stamp for {missing}: did the setup hook run?")
        points = [("client sends", sent), *((stage, seen[stage]) for stage in STAGES),
                  ("client", received)]
        rows.append({f"{a} -> {b}": (tb - ta) * 1e3
                     for (a, ta), (b, tb) in zip(points, points[1:], strict=False)}
                    | {"ttft": (received - sent) * 1e3})
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def offline(config: Config, prompts: list[list[int]], warmup: list[list[int]]) -> float:
    """The median time to first token of the prompts one at a time, in milliseconds."""
    llm = LLM(config=config)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    try:
        for prompt in warmup:
            llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
        ttft = []
        for prompt in prompts:
            output, = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
            ttft.append((output.metrics.first_token_time - output.metrics.arrival_time) * 1e3)
    finally:
        llm.shutdown()
    return statistics.median(ttft)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/llama-3-8b-h200-sim.yaml")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/first_token.json"))
    args = parser.parse_args()
    config = load(args.config)
    rng = random.Random(args.seed)
    prompts, warmup = ([[rng.randrange(100, 30000) for _ in range(args.prompt_len)]
                        for _ in range(count)] for count in (args.requests, 5))
    print(f"{args.config}, {args.requests} requests of {args.prompt_len} prompt tokens, "
          f"host CPU {cpu_model()}", flush=True)
    offline_ms = offline(config, prompts, warmup)
    stages = served(config, prompts, warmup)
    lines = ["| stage | median ms |", "|---|---:|"]
    lines += [f"| {stage} | {ms:.2f} |" for stage, ms in stages.items() if stage != "ttft"]
    lines += [f"| time to first token, served | {stages['ttft']:.2f} |",
              f"| time to first token, offline | {offline_ms:.2f} |",
              f"| **added by serving** (target <= 5) | **{stages['ttft'] - offline_ms:.2f}** |"]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "cpu": cpu_model(), "config": args.config,
        "args": {k: str(v) for k, v in vars(args).items()}, "stages_ms": stages,
        "offline_ttft_ms": offline_ms}, indent=2))


if __name__ == "__main__":
    main()
