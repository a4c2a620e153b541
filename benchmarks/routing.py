"""Prefix-aware routing vs Ray Serve's default router, and a scaling trace.

1. Routing. Two LLMServer replicas serve a multi-tenant workload: `--tenants`
   tenants, each with its own `--system-len`-token system prompt, then a
   request's own `--user-len` tokens and `--output-len` generated tokens
   (token-id prompts, greedy, ignore_eos), all requests sent at once in a
   seeded random order. Each replica's KV pool (`--pool-blocks`) holds clearly
   fewer than half the tenants' prefixes besides the running requests (160
   blocks: about 4.6 of 12), as when tenants outnumber what the replicas can
   cache between them: both routers must evict. The same workload runs behind Serve's
   default router (the shorter queue of two random replicas) and behind
   `serving.request_router: prefix_aware`, one after the other in one
   invocation. Reported: prefix-cache hit rate (hit / queried prompt tokens,
   from the replicas' own `ray_pagedserve_prefix_cache_*` metrics) and output
   throughput. Targets: hit rate >= 1.8x and throughput >= 1.3x the default's.

2. Scaling trace (`--trace`). configs/tiny-cpu-autoscale.yaml under a load
   ramp (concurrent streaming clients 0 -> `--peak-clients` -> 0); replicas,
   mean KV utilization and waiting requests sampled every half second, plotted
   to `scaling_trace.png`.

    python benchmarks/routing.py [--requests 288] [--tenants 12] [--trace]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import re
import socket
import threading
import time
from pathlib import Path

import aiohttp
import httpx
import ray
from ray import serve

from pagedserve.cluster.app import build, serve_environment
from pagedserve.config import load, parse

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FIRST_TOKEN = 6  # ids below are special tokens
# throughput.py's model shape with the tokenizer's vocabulary: 25M parameters, float32.
SMALL = dict(vocab_size=512, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, intermediate_size=1408, max_position_embeddings=2048)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def workload(args) -> list[list[int]]:
    rng = random.Random(args.seed)
    systems = [[rng.randrange(FIRST_TOKEN, 512) for _ in range(args.system_len)]
               for _ in range(args.tenants)]
    return [systems[rng.randrange(args.tenants)]
            + [rng.randrange(FIRST_TOKEN, 512) for _ in range(args.user_len)]
            for _ in range(args.requests)]


def metric_sum(text: str, metric: str, model: str) -> float:
    pattern = re.compile(rf'^ray_pagedserve_{metric}\{{([^}}]*)\}} (\S+)$', re.M)
    return sum(float(value) for tags, value in pattern.findall(text)
               if f'model_name="{model}"' in tags)


async def run_requests(url: str, model: str, prompts: list[list[int]], output_len: int) -> float:
    body = {"model": model, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True}
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:
        async def one(prompt: list[int]) -> int:
            async with session.post(url, json={**body, "prompt": prompt}) as response:
                answer = await response.json()
                if response.status != 200:
                    raise RuntimeError(f"{response.status}: {answer}")
                return answer["usage"]["completion_tokens"]

        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(p) for p in prompts)))
        return tokens / (time.perf_counter() - start)


def routing_run(args, router: str, port: int, metrics_url: str, prompts) -> dict:
    model = f"routing-{router}"
    data = load(CONFIGS / "tiny-cpu.yaml").model_dump()
    data["model"]["random_init"] = {"name": "bench-25m", "config_overrides": SMALL}
    data["model"]["max_model_len"] = 1024
    data["engine"].update(num_gpu_blocks=args.pool_blocks, max_num_seqs=args.max_num_seqs)
    data["parallel"]["worker_cpus"] = 0.5
    data["serving"].update(served_model_name=model, request_router=router,
                           routing_stats_period_s=1.0,
                           router_imbalance_threshold=args.imbalance_threshold)
    data["autoscaling"].update(min_replicas=2, max_replicas=2)
    serve.run(build(parse(data)), name=model, route_prefix=f"/{model}")
    url = f"http://127.0.0.1:{port}/{model}/v1/completions"
    asyncio.run(run_requests(url, model, [[FIRST_TOKEN + 1] * 8] * 2, 2))  # warm-up
    throughput = asyncio.run(run_requests(url, model, prompts, args.output_len))
    deadline = time.monotonic() + 30
    while True:  # until every request's prompt tokens are exported
        text = httpx.get(metrics_url, timeout=10).text
        served = metric_sum(text, "prompt_tokens_total", model)
        if served >= sum(map(len, prompts)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    hits = metric_sum(text, "prefix_cache_hits_total", model)
    queries = metric_sum(text, "prefix_cache_queries_total", model)
    serve.delete(model)
    return dict(router=router, output_tokens_per_s=throughput, hit_tokens=hits,
                queried_tokens=queries, hit_rate=hits / queries if queries else 0.0)


def scaling_trace(args, port: int, metrics_url: str, out: Path) -> dict:
    data = load(CONFIGS / "tiny-cpu-autoscale.yaml").model_dump()
    serve.run(build(parse(data)), name="trace", route_prefix="/trace")
    url = f"http://127.0.0.1:{port}/trace/v1/completions"
    body = {"model": "tiny-llama", "prompt": "Scale me " * 30, "max_tokens": 300,
            "ignore_eos": True}
    wanted = [0]  # clients that should be running now
    stop = threading.Event()

    def client(index: int) -> None:
        with httpx.Client(timeout=600) as session:
            while not stop.is_set():
                if index < wanted[0]:
                    session.post(url, json=body).raise_for_status()
                else:
                    time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(i,), daemon=True)
               for i in range(args.peak_clients)]
    for thread in threads:
        thread.start()
    # Ramp: 10 s idle, up one client every 2 s to the peak, hold 20 s, down fast, 40 s idle.
    ramp = ([0] * 20 + [c for c in range(1, args.peak_clients + 1) for _ in range(4)]
            + [args.peak_clients] * 40 + [0] * 80)
    samples = []
    start = time.monotonic()
    for clients in ramp:
        wanted[0] = clients
        status = serve.status().applications["trace"].deployments["LLMServer"]
        text = httpx.get(metrics_url, timeout=10).text
        usage = re.findall(r'^ray_pagedserve_kv_cache_usage_perc\{[^}]*\} (\S+)$', text, re.M)
        samples.append(dict(t=time.monotonic() - start, clients=clients,
                            replicas=status.replica_states.get("RUNNING", 0),
                            utilization=max(map(float, usage), default=0.0),
                            waiting=metric_sum(text, "num_requests_waiting", "tiny-llama")))
        time.sleep(max(0.0, start + 0.5 * len(samples) - time.monotonic()))
    stop.set()
    for thread in threads:
        thread.join(timeout=600)
    serve.delete("trace")
    plot_trace(samples, out)
    return dict(samples=samples)


def plot_trace(samples: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    axes[0].step(t, [s["replicas"] for s in samples], where="post", label="running replicas")
    axes[0].step(t, [s["clients"] / 6 for s in samples], where="post", linestyle=":",
                 label="load (clients / 6)")
    axes[0].set_ylabel("replicas")
    axes[0].legend(loc="upper right")
    axes[1].plot(t, [s["utilization"] for s in samples])
    axes[1].axhline(0.5, color="gray", linestyle="--", label="target_utilization")
    axes[1].set_ylabel("KV usage (max replica)")
    axes[1].legend(loc="upper right")
    axes[2].plot(t, [s["waiting"] for s in samples])
    axes[2].set_ylabel("waiting requests")
    axes[2].set_xlabel("seconds")
    fig.suptitle("kv_utilization autoscaling under a load ramp (configs/tiny-cpu-autoscale.yaml)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=288)
    parser.add_argument("--tenants", type=int, default=12)
    parser.add_argument("--system-len", type=int, default=512)
    parser.add_argument("--user-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--pool-blocks", type=int, default=160,
                        help="KV blocks per replica (16 tokens each)")
    parser.add_argument("--max-num-seqs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--imbalance-threshold", type=int, default=8,
                        help="serving.router_imbalance_threshold of the prefix-aware run")
    parser.add_argument("--trace", action="store_true", help="also record the scaling trace")
    parser.add_argument("--peak-clients", type=int, default=12)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    serve_environment()
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    metrics_port, port = free_port(), free_port()
    ray.init(logging_level="ERROR", include_dashboard=False, _metrics_export_port=metrics_port)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    prompts = workload(args)
    rows = [routing_run(args, router, port, metrics_url, prompts)
            for router in ("default", "prefix_aware")]
    base, aware = rows
    print("\n| router | prefix-cache hit rate | output tok/s |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['router']} | {row['hit_rate']:.1%} | {row['output_tokens_per_s']:.1f} |")
    hit_ratio = aware["hit_rate"] / base["hit_rate"] if base["hit_rate"] else float("inf")
    speedup = aware["output_tokens_per_s"] / base["output_tokens_per_s"]
    print(f"\nprefix_aware / default: hit rate {hit_ratio:.2f}x (target >= 1.8), "
          f"throughput {speedup:.2f}x (target >= 1.3)", flush=True)
    trace = scaling_trace(args, port, metrics_url, args.out_dir / "scaling_trace.png") \
        if args.trace else None
    if trace:
        peak = max(s["replicas"] for s in trace["samples"])
        print(f"scaling trace: peak {peak} replicas, last {trace['samples'][-1]['replicas']}; "
              f"plot in {args.out_dir / 'scaling_trace.png'}")
    serve.shutdown()
    ray.shutdown()
    (args.out_dir / "routing.json").write_text(json.dumps(dict(
        date=datetime.date.today().isoformat(), machine=platform.machine(),
        args={k: str(v) for k, v in vars(args).items()}, rows=rows, hit_ratio=hit_ratio,
        speedup=speedup, trace=trace), indent=2))


if __name__ == "__main__":
    main()
