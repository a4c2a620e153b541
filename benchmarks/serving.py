"""Online serving vs offline generation: throughput and latency through the HTTP API.

One invocation runs the same workload twice on the same model (by default
throughput.py's random Llama shape, hidden 512 x 8 layers, with the tiny
tokenizer's 512-token vocabulary so every token streams as text: 25M
parameters; `--model tiny` takes the embedded default of configs/tiny-cpu.yaml,
whose steps are so short that the per-token cost of streaming dominates):

1. offline: `LLM.generate` on every request at once, the engine's best case;
2. served: `pagedserve`'s Ray Serve app on this machine, fed by an async
   streaming client (`/v1/completions`, token-id prompts, ignore_eos) at
   Poisson arrival rates of `--rates` requests/s ("inf" sends everything at once).

Both run the model with the same torch threads: served, the model runs in a
worker actor (the LLMServer replica schedules and streams) that reserves
`parallel.worker_cpus` CPUs and runs as many threads, and the offline engine
gets as many. `--backend local` runs the model inside the replica instead.

Per rate it reports request and output-token throughput, and TTFT (time to the
first streamed token), TPOT (per output token after the first), ITL (between
streamed chunks) and end-to-end latency at p50/p90/p99. Token counts come from
the server's `usage`, so they are exact. The target: the served path at rate
inf keeps >= 80% of the offline output-token throughput. The client runs on
the same cores as the server, so its own parsing counts against the server.
Per rate it also prints the CPU seconds the busiest processes used (psutil):
where the serving plane's CPU goes.

    python benchmarks/serving.py [--requests 128] [--rates 4 16 inf]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import random
import socket
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import psutil
import ray
import torch
from ray import serve

from pagedserve import LLM, SamplingParams
from pagedserve.cluster.app import build, serve_environment
from pagedserve.config import load, parse
from pagedserve.model.embedded import served_model_name

FIRST_TOKEN = 6  # ids below are special tokens
# throughput.py's model shape with the tokenizer's vocabulary: 25M parameters, float32.
SMALL = dict(vocab_size=512, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, intermediate_size=1408, max_position_embeddings=2048)


@dataclass
class Result:
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None


def workload(args, vocab_size: int) -> list[tuple[list[int], int]]:
    """Seeded (token-id prompt, output length) pairs."""
    rng = random.Random(args.seed)
    return [([rng.randrange(FIRST_TOKEN, vocab_size)
              for _ in range(rng.randint(*args.prompt_len))],
             rng.randint(*args.output_len)) for _ in range(args.requests)]


def offline(config, requests, threads: int) -> dict:
    torch.set_num_threads(threads)
    llm = LLM(config=config)
    warm = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm.generate({"prompt_token_ids": [FIRST_TOKEN] * 16}, warm, use_tqdm=False)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in requests]
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p, _ in requests], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    llm.shutdown()
    return dict(seconds=elapsed, requests_per_s=len(requests) / elapsed,
                output_tokens_per_s=tokens / elapsed, output_tokens=tokens)


async def one_request(session: aiohttp.ClientSession, url: str, model: str, prompt: list[int],
                      max_tokens: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    result, start = Result(), time.perf_counter()
    last = start
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                result.error = f"{response.status}: {await response.text()}"
                return result
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["text"]:
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
    except aiohttp.ClientError as error:
        result.error = repr(error)
    result.e2e = time.perf_counter() - start
    return result


async def served(url: str, model: str, requests, rate: float,
                 seed: int) -> tuple[float, list[Result]]:
    rng = np.random.default_rng(seed)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = []
        start = time.perf_counter()
        for prompt, max_tokens in requests:
            tasks.append(asyncio.create_task(one_request(session, url, model, prompt,
                                                         max_tokens)))
            if rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / rate))
        results = await asyncio.gather(*tasks)
        return time.perf_counter() - start, results


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of every process on this machine, by pid, with its name."""
    seconds = {}
    for process in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        info = process.info
        if info["cpu_times"] is None:
            continue
        name = " ".join(info["cmdline"] or [])[:48] or info["name"]
        seconds[process.pid] = (name, info["cpu_times"].user + info["cpu_times"].system)
    return seconds


def cpu_by_process(before: dict, after: dict, top: int = 6) -> list[tuple[str, float]]:
    """The processes that used the most CPU between two `cpu_seconds()` readings."""
    used = [(name, total - before[pid][1]) for pid, (name, total) in after.items()
            if pid in before]
    return sorted(used, key=lambda item: -item[1])[:top]


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    array = np.asarray(values) * 1e3
    return {f"p{p}": float(np.percentile(array, p)) for p in (50, 90, 99)}


def summarize(rate: float, elapsed: float, results: list[Result]) -> dict:
    ok = [r for r in results if r.error is None]
    tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return dict(rate=rate, seconds=elapsed, errors=len(results) - len(ok),
                requests_per_s=len(ok) / elapsed, output_tokens_per_s=tokens / elapsed,
                output_tokens=tokens,
                ttft_ms=percentiles([r.ttft for r in ok]), tpot_ms=percentiles(tpot),
                itl_ms=percentiles([x for r in ok for x in r.itl]),
                e2e_ms=percentiles([r.e2e for r in ok]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["small", "tiny"], default="small")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[32, 256])
    parser.add_argument("--output-len", type=int, nargs=2, default=[16, 128])
    parser.add_argument("--rates", type=float, nargs="+", default=[4.0, 16.0, float("inf")])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream-interval-s", type=float, default=0.0)
    parser.add_argument("--worker-cpus", type=float, default=1.0,
                        help="CPUs (and torch threads) of the served model's worker")
    parser.add_argument("--backend", choices=["auto", "local", "ray"], default="auto",
                        help="parallel.distributed_executor_backend of the served engine")
    parser.add_argument("--offline-threads", type=int, default=0,
                        help="torch threads of the offline run (default: the replica's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serving.json"))
    args = parser.parse_args()

    data = load("configs/tiny-cpu.yaml").model_dump()
    if args.model == "small":
        data["model"]["random_init"] = {"name": "bench-25m", "config_overrides": SMALL}
        data["engine"].update(kv_cache_memory_gb=1.0, max_num_seqs=128)
    data["serving"]["stream_interval_s"] = args.stream_interval_s
    data["parallel"]["worker_cpus"] = args.worker_cpus
    data["parallel"]["distributed_executor_backend"] = args.backend
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        data["serving"]["port"] = sock.getsockname()[1]
    config = parse(data)
    model = served_model_name(config)
    offline_config = parse({**data, "parallel": {**data["parallel"],
                                                  "distributed_executor_backend": "local"}})
    requests = workload(args, 512)

    # By default the served worker's torch threads: as many as its worker_cpus.
    threads = args.offline_threads or max(1, int(config.parallel.worker_cpus))
    base = offline(offline_config, requests, threads)
    print(f"offline ({threads} torch threads): {base['output_tokens_per_s']:.1f} output tok/s, "
          f"{base['requests_per_s']:.2f} req/s ({base['seconds']:.1f} s)", flush=True)

    serve_environment()  # Serve's throughput mode, as `pagedserve serve` runs it
    ray.init(logging_level="ERROR", include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": config.serving.port})
    serve.run(build(config), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{config.serving.port}/v1/completions"
    asyncio.run(served(url, model, requests[:4], float("inf"), args.seed))  # warm-up
    rows = []
    for rate in args.rates:
        before = cpu_seconds()
        elapsed, results = asyncio.run(served(url, model, requests, rate, args.seed))
        row = summarize(rate, elapsed, results)
        row["cpu_seconds"] = cpu_by_process(before, cpu_seconds())
        rows.append(row)
        print(f"rate {rate:g}: {row['output_tokens_per_s']:.1f} output tok/s, "
              f"{row['requests_per_s']:.2f} req/s, {row['errors']} errors; CPU seconds in "
              f"{elapsed:.1f} s: " + ", ".join(f"{name.strip()} {seconds:.1f}"
                                                for name, seconds in row["cpu_seconds"]),
              flush=True)
    serve.shutdown()
    ray.shutdown()

    print("\n| arrival rate (req/s) | req/s | output tok/s | TTFT p50/p90/p99 ms "
          "| TPOT p50/p90/p99 ms | ITL p50/p90/p99 ms | E2E p50/p90/p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        cells = [" / ".join(f"{row[k][p]:.0f}" for p in ("p50", "p90", "p99"))
                 for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")]
        print(f"| {row['rate']:g} | {row['requests_per_s']:.2f} | "
              f"{row['output_tokens_per_s']:.1f} | " + " | ".join(cells) + " |")
    print(f"| offline (LLM.generate) | {base['requests_per_s']:.2f} | "
          f"{base['output_tokens_per_s']:.1f} | | | | |")
    burst = next((r for r in rows if r["rate"] == float("inf")), rows[-1])
    ratio = burst["output_tokens_per_s"] / base["output_tokens_per_s"]
    print(f"\nserved / offline output throughput at rate {burst['rate']:g}: {ratio:.2f} "
          f"(target >= 0.80: {'met' if ratio >= 0.8 else 'NOT met'})")
    assert statistics.fmean([r["errors"] for r in rows]) == 0, "requests failed"

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(
        date=datetime.date.today().isoformat(), machine=platform.machine(),
        args={k: str(v) for k, v in vars(args).items()}, offline=base, served=rows,
        ratio=ratio), indent=2))


if __name__ == "__main__":
    main()
