"""Keeping up with a GPU: the engine's host side against a simulated device.

The model runs on the simulated accelerator (pagedserve/worker/simulated.py):
every step takes the device time a roofline model gives for Llama-3-8B on an
H200 (or the config's shape and GPU), spent asleep. What is measured is
everything else, on this machine's CPU: scheduling, building steps, taking in
tokens, detokenizing, stop strings, and (with --served) the serving path.
The kernels themselves are not measured.

Offline, at each batch size, the same requests (prompts of 512-1536 tokens,
512 new tokens each, so contexts of 512-2048; new prompts each round, so the
prefix cache never hits) run through `LLM.generate` with `async_scheduling`
off and on, alternating over `--rounds`:

- throughput against the device bound: the sum of the simulated step times
  over the wall time (1.0: the device never waited);
- host time per step: the wall time the device waited for the host
  (`get_step_stats()["host_s"]`) over the steps, and its share of the wall time.

Targets: >= 0.95 of the bound at batch 256 with async scheduling, and
<= 3 ms of host time per step there.

With --fp8, the same again with FP8 weights (model.quantization fp8: the
linear layers at one byte a weight, computed at the GPU's FP8 rate where it
has one) and an FP8 KV cache (engine.kv_cache_dtype fp8: one byte a value,
twice the blocks), and the device-bound tokens/s of the two side by side: how
much faster the simulated GPU's steps are, and whether the host keeps up
with the shorter steps.

With --served, the same engine behind `pagedserve serve`'s Ray Serve app on
this machine, against the offline engine on the same requests (prompts of
256-768 tokens, `--served-output-len` new tokens), at each of `--streams`
concurrent streaming clients, through both ways in: Serve's proxy
(`serving.proxy_port`) and the ingress replica itself (`serving.port`, direct
ingress), alternating over `--served-rounds`, medians:

- output tokens/s as the client receives them, against offline;
- CPU microseconds per streamed token of each serving process (proxy,
  ingress, its inbox, the LLMServer replica, the rest of Ray) and of the client;
- time to first token, served minus offline, at 1 and 32 clients.

With `--ingress 2 4`, also through that many ingress replicas
(`serving.ingress_replicas`) behind Serve's HAProxy on `serving.port`, each
count on a Ray cluster of its own; HAProxy's CPU counts in the serving plane.

The client runs in its own process: raw aiohttp streams, each SSE line
counted, JSON parsed only for the final usage chunk.

    python benchmarks/gpu_rate.py [--config configs/llama-3-8b-h200-sim.yaml]
                                  [--batches 64 256 512] [--rounds 3] [--fp8]
                                  [--served] [--streams 64 256 1024]
                                  [--served-rounds 3] [--ingress 1 2 4]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import random
import statistics
import time
from pathlib import Path

from served_load import (
    SERVING_PLANE,
    cpu_by_role,
    free_ports,
    run_clients,
    served_requests,
    serving_processes,
)

from pagedserve import LLM, SamplingParams
from pagedserve.config import Config, load

MODES = {"sync": False, "async": True}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def requests(batch: int, seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(512, 1536))]
            for _ in range(batch)]


def with_engine(config: Config, **fields) -> Config:
    return config.model_copy(update={"engine": config.engine.model_copy(update=fields)})


def fp8_variant(config: Config) -> Config:
    """The config with its float weights quantized to FP8 at load and an FP8 KV cache."""
    model = config.model.model_copy(update={"quantization": "fp8"})
    return with_engine(config.model_copy(update={"model": model}), kv_cache_dtype="fp8")


def offline_run(llm: LLM, prompts: list[list[int]], output_len: int) -> dict:
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    llm.engine.reset_step_stats()
    start, cpu = time.perf_counter(), time.process_time()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    stats = llm.get_step_stats()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"wall_s": wall, "cpu_s": cpu, "tokens": tokens, "tokens_per_s": tokens / wall,
            "bound_tokens_per_s": tokens / stats["device_s"],
            "of_bound": stats["device_s"] / wall, "steps": stats["steps"],
            "host_ms_per_step": stats["host_s"] / stats["steps"] * 1e3,
            "host_share": stats["host_s"] / wall,
            "preemptions": llm.get_memory_stats()["num_preemptions"]}


def offline(config: Config, batches: list[int], rounds: int, output_len: int,
            seed: int) -> dict:
    engines = {mode: LLM(config=with_engine(config, async_scheduling=on))
               for mode, on in MODES.items()}
    vocab = min(engines["sync"].engine.info.vocab_size, 40000)
    results: dict = {}
    try:
        for llm in engines.values():  # warm-up: first-step costs out of the figures
            llm.generate({"prompt_token_ids": [100] * 64}, SamplingParams(max_tokens=4),
                         use_tqdm=False)
        for batch in batches:
            runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
            for round_index in range(rounds):  # alternate the modes: the machine is noisy
                # Fresh prompts each round (the same for both modes): no prefix-cache hits.
                prompts = requests(batch, seed + 1000 * round_index + batch, vocab)
                order = list(MODES) if round_index % 2 == 0 else list(reversed(MODES))
                for mode in order:
                    run = offline_run(engines[mode], prompts, output_len)
                    runs[mode].append(run)
                    print(f"batch {batch} round {round_index} {mode:5}: "
                          f"{run['tokens_per_s']:8.0f} tok/s, {run['of_bound']:.3f} of the "
                          f"bound, host {run['host_ms_per_step']:.2f} ms/step "
                          f"({run['host_share']:.1%}), {run['steps']} steps", flush=True)
            results[batch] = {mode: {"median": {key: statistics.median(r[key] for r in rs)
                                                for key in rs[0]}, "runs": rs}
                              for mode, rs in runs.items()}
    finally:
        for llm in engines.values():
            llm.shutdown()
    return results


def fp8_report(base: dict, fp8: dict, dtype: str) -> str:
    """Device-bound and measured tokens/s, async medians: the config's against FP8's."""
    lines = [f"| batch | {dtype} bound tok/s | FP8 bound tok/s | FP8 / {dtype} | "
             f"{dtype} of bound | FP8 of bound |", "|---:|---:|---:|---:|---:|---:|"]
    for batch in base:
        b, f = base[batch]["async"]["median"], fp8[batch]["async"]["median"]
        lines.append(f"| {batch} | {b['bound_tokens_per_s']:.0f} | {f['bound_tokens_per_s']:.0f} "
                     f"| {f['bound_tokens_per_s'] / b['bound_tokens_per_s']:.2f}x | "
                     f"{b['of_bound']:.3f} | {f['of_bound']:.3f} |")
    return "\n".join(lines)


def report(results: dict, gpu: str) -> str:
    lines = ["| batch | mode | output tok/s | device bound tok/s | of bound | "
             "host ms/step | host share | steps |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for batch, modes in results.items():
        for mode, entry in modes.items():
            m = entry["median"]
            lines.append(f"| {batch} | {mode} | {m['tokens_per_s']:.0f} | "
                         f"{m['bound_tokens_per_s']:.0f} | {m['of_bound']:.3f} | "
                         f"{m['host_ms_per_step']:.2f} | {m['host_share']:.1%} | "
                         f"{m['steps']:.0f} |")
    if 256 in results:
        m = results[256]["async"]["median"]
        lines.append("")
        lines.append(f"batch 256, async, simulated {gpu}: {m['of_bound']:.3f} of the bound "
                     f"(target >= 0.95: {'met' if m['of_bound'] >= 0.95 else 'NOT met'}), "
                     f"host {m['host_ms_per_step']:.2f} ms/step (target <= 3: "
                     f"{'met' if m['host_ms_per_step'] <= 3 else 'NOT met'})")
    return "\n".join(lines)


# -- served ---------------------------------------------------------------------------------

def offline_first_token(llm: LLM, prompts: list[list[int]], max_tokens: int) -> dict:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - start
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outputs]
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"wall_s": wall, "tokens_per_s": tokens / wall, "ttft_s": statistics.median(ttft)}


PATHS = ("proxy", "direct")  # Serve's proxy, then the ingress replica; direct ingress


def served_run(url: str, model: str, prompts: list[list[int]], max_tokens: int,
               roles: dict[int, str]) -> dict:
    before = cpu_by_role(roles)
    out = run_clients(url, model, prompts, max_tokens)
    after = cpu_by_role(roles)
    done = [r for r in out["results"] if "error" not in r]
    tokens = sum(r["tokens"] for r in done)
    cpu = {role: after[role] - before.get(role, 0.0) for role in after}
    cpu["client"] = out["cpu_s"]
    return {"errors": len(out["results"]) - len(done), "tokens": tokens,
            "chunks": sum(r["chunks"] for r in done), "tokens_per_s": tokens / out["wall_s"],
            "ttft_s": statistics.median(r["ttft_s"] for r in done),
            "cpu_us_per_token": {role: seconds / tokens * 1e6 for role, seconds in cpu.items()},
            "serving_us_per_token": sum(seconds for role, seconds in cpu.items()
                                        if role in SERVING_PLANE) / tokens * 1e6}


def served(config: Config, streams: list[int], output_len: int, seed: int,
           rounds: int, ingress: list[int]) -> dict:
    """Each stream count through each way in, alternating over `rounds`; medians. With
    one ingress replica the ways in are Serve's proxy and the replica itself (direct
    ingress); with several, Serve's HAProxy in front of them. Each ingress count runs
    on a Ray cluster of its own, one after the other."""
    from pagedserve.model.embedded import served_model_name

    first = free_ports(2)
    serving = config.serving.model_copy(update={"port": first, "proxy_port": first + 1,
                                                "direct_ingress": True})
    config = config.model_copy(update={"serving": serving})
    _serve_environment(config)  # before Ray starts: a TP config's offline engine starts it
    offline_llm = LLM(config=config)
    vocab = min(offline_llm.engine.info.vocab_size, 40000)
    workloads = {n: served_requests(n, seed + n, vocab) for n in sorted({1, 32, *streams})}
    offline_llm.generate({"prompt_token_ids": [100] * 64}, SamplingParams(max_tokens=4),
                         use_tqdm=False)
    base = {n: offline_first_token(offline_llm, prompts, output_len if n > 32 else 16)
            for n, prompts in workloads.items()}
    offline_llm.shutdown()
    model = served_model_name(config)
    results: dict = {n: {} for n in workloads}
    for count in ingress:
        # Ports of its own: the last cluster's are held a minute by connections closing.
        first = free_ports(2 + 2 * count)  # port, proxy_port, the ingress replicas'
        scaled = config.model_copy(update={"serving": config.serving.model_copy(
            update={"ingress_replicas": count, "port": first, "proxy_port": first + 1})})
        port, proxy_port = scaled.serving.port, scaled.serving.http_proxy_port
        urls = ({"proxy": f"http://127.0.0.1:{proxy_port}/v1/completions",
                 "direct": f"http://127.0.0.1:{port}/v1/completions"} if count == 1 else
                {f"HAProxy, {count} ingress": f"http://127.0.0.1:{port}/v1/completions"})
        with _serving(scaled):
            for index, url in enumerate(urls.values()):  # warm-up, on prompts of its own
                run_clients(url, model, served_requests(4 * count, seed - 1 - index, vocab), 8)
            roles = serving_processes()
            for n, prompts in workloads.items():
                _served_runs(results[n], urls, n, prompts, base[n], model, roles,
                             output_len if n > 32 else 16, seed, rounds, vocab)
    return results


def _serve_environment(config: Config) -> None:
    """Serve's environment for `config`, replacing what a previous ingress count set."""
    import os

    from pagedserve.cluster.app import serve_env

    for name in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"):
        os.environ.pop(name, None)
    os.environ.update(serve_env(config))


@contextlib.contextmanager
def _serving(config: Config, runtime_env: dict | None = None):
    """The app on a Ray cluster of its own, started with Serve's environment for it
    (and `runtime_env`, the job's, for every worker process)."""
    import ray
    from ray import serve

    from pagedserve.cluster.app import build, http_options

    if ray.is_initialized():  # a TP config's offline engine started one: not for this
        ray.shutdown()
    _serve_environment(config)
    ray.init(logging_level="ERROR", include_dashboard=False, runtime_env=runtime_env)
    try:
        serve.start(http_options=http_options(config))
        serve.run(build(config), name="gpu-rate", route_prefix="/")
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def _served_runs(results: dict, urls: dict[str, str], n: int, prompts: list[list[int]],
                 base: dict, model: str, roles: dict[int, str], max_tokens: int, seed: int,
                 rounds: int, vocab: int) -> None:
    """`n` streams through each of `urls`, alternating over `rounds`; their medians."""
    paths = list(urls)
    runs: dict[str, list[dict]] = {path: [] for path in paths}
    for index in range(rounds):
        for order, path in enumerate(paths if index % 2 == 0 else paths[::-1]):
            # Fresh prompts each run (the first is offline's): the prefix cache would
            # otherwise skip every prefill after the first.
            fresh = prompts if index == order == 0 else served_requests(
                n, seed + n + 1000 * (2 * index + order) + 100 * len(results), vocab)
            runs[path].append(served_run(urls[path], model, fresh, max_tokens, roles))
    for path, path_runs in runs.items():
        row = {"streams": n, "rounds": len(path_runs),
               "errors": sum(r["errors"] for r in path_runs),
               "offline_tokens_per_s": base["tokens_per_s"], "offline_ttft_s": base["ttft_s"]}
        for key in ("tokens_per_s", "ttft_s", "serving_us_per_token"):
            row[key] = statistics.median(r[key] for r in path_runs)
        row["cpu_us_per_token"] = {
            role: statistics.median(r["cpu_us_per_token"].get(role, 0.0) for r in path_runs)
            for role in path_runs[0]["cpu_us_per_token"]}
        row["of_offline"] = row["tokens_per_s"] / row["offline_tokens_per_s"]
        results[path] = row
        print(f"{n} streams, {path}: {row['tokens_per_s']:.0f} tok/s received, "
              f"{row['of_offline']:.2f} of offline, serving CPU "
              f"{row['serving_us_per_token']:.0f} us/token, TTFT "
              f"{row['ttft_s'] * 1e3:.1f} ms (offline "
              f"{row['offline_ttft_s'] * 1e3:.1f}), {row['errors']} errors", flush=True)


def served_report(results: dict) -> str:
    lines = ["| streams | path | received tok/s | offline tok/s | served/offline | "
             "serving-plane CPU µs/token | CPU µs per token by process | "
             "TTFT served − offline ms |",
             "|---:|---|---:|---:|---:|---:|---|---:|"]
    for n, paths in results.items():
        for path, row in paths.items():
            by_role = ", ".join(f"{role} {us:.0f}"
                                for role, us in sorted(row["cpu_us_per_token"].items()))
            lines.append(
                f"| {n} | {path} | {row['tokens_per_s']:.0f} | "
                f"{row['offline_tokens_per_s']:.0f} | {row['of_offline']:.2f} | "
                f"{row['serving_us_per_token']:.0f} | {by_role} | "
                f"{(row['ttft_s'] - row['offline_ttft_s']) * 1e3:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/llama-3-8b-h200-sim.yaml")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp8", action="store_true",
                        help="also run the config with FP8 weights (model.quantization fp8) "
                             "and an FP8 KV cache (engine.kv_cache_dtype fp8), and compare "
                             "device-bound tokens/s")
    parser.add_argument("--served", action="store_true",
                        help="also measure the serving path (Ray Serve) against offline")
    parser.add_argument("--served-only", action="store_true")
    parser.add_argument("--streams", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--served-output-len", type=int, default=128)
    parser.add_argument("--served-rounds", type=int, default=3)
    parser.add_argument("--ingress", type=int, nargs="+", default=[1],
                        help="ingress replicas (serving.ingress_replicas) to serve through, "
                             "each count on a Ray cluster of its own; above 1 behind Serve's "
                             "HAProxy")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_rate.json"))
    args = parser.parse_args()
    config = load(args.config)
    if config.engine.simulator is None:
        raise SystemExit(f"{args.config} has no engine.simulator: this benchmark measures "
                         "the host side against a simulated GPU")
    gpu = config.engine.simulator.gpu
    print(f"{args.config}: {config.model.path} on simulated {gpu} x "
          f"{config.parallel.tensor_parallel_size}; host CPU {cpu_model()}", flush=True)
    results, fp8, serving = {}, {}, {}
    if not args.served_only:
        results = offline(config, args.batches, args.rounds, args.output_len, args.seed)
        print()
        print(report(results, gpu))
        if args.fp8:
            print("\nFP8 weights and FP8 KV cache (model.quantization fp8, "
                  "engine.kv_cache_dtype fp8):", flush=True)
            fp8 = offline(fp8_variant(config), args.batches, args.rounds, args.output_len,
                          args.seed)
            print()
            print(report(fp8, f"{gpu}, FP8"))
            print()
            print(fp8_report(results, fp8, config.model.dtype))
    if args.served or args.served_only:
        serving = served(config, args.streams, args.served_output_len, args.seed,
                         args.served_rounds, args.ingress)
        print()
        print(served_report(serving))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "cpu": cpu_model(), "config": args.config,
        "args": {k: str(v) for k, v in vars(args).items()},
        "offline": {str(batch): modes for batch, modes in results.items()},
        "offline_fp8": {str(batch): modes for batch, modes in fp8.items()},
        "served": {str(n): row for n, row in serving.items()}}, indent=2))


if __name__ == "__main__":
    main()
