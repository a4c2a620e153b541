"""Per-step cost of dispatching through Ray: RayExecutor against LocalExecutor.

The same tiny model (configs/tiny-cpu.yaml's random Llama, float32) runs
decode steps in one invocation with LocalExecutor in this process and with
RayExecutor three ways: one actor through plain calls (the CPU default: a
`ray.put`, or the step inline for one rank, and a call per rank), one actor
through a Ray compiled graph (the GPU default), and two tensor-parallel actors
through plain calls. Every worker uses one torch thread, so TP=1 computes the
same work with the same threads either way and the difference is dispatch.

This machine's speed drifts by tens of percent over a minute, more than the
dispatch cost, so each Ray engine is measured against the local engine step
by step: the two take turns, and "added" is the median of the paired
differences (Ray step minus the local step just before it).

Reported, as medians over `--steps` steps (after an untimed pass that touches
the KV pool's pages, and `--warmup` steps):
- an empty step (no sequences): the pure round trip;
- a decode step (EngineCore.step: schedule, execute, update) at batch 1 and
  64, and what Ray adds to it;
- the empty step's median in consecutive windows of a long run, which stays
  flat if nothing accumulates from step to step.

    python benchmarks/dispatch.py [--steps 300] [--windows 5 --window-steps 1000]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import ray
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.config import ParallelConfig, load
from pagedserve.scheduler.step import StepInput

PROMPT_TOKENS = 16


def build(config_path: str, backend: str, tp_size: int, compiled: bool = False) -> LLM:
    config = load(config_path)
    parallel = ParallelConfig(tensor_parallel_size=tp_size, distributed_executor_backend=backend,
                              worker_cpus=1.0, ray_compiled_graph=compiled)
    return LLM(config=config.model_copy(update={"parallel": parallel}))


def empty_steps(llm: LLM, steps: int) -> list[float]:
    execute, step = llm.engine.executor.execute, StepInput(seqs=[])
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        execute(step)
        times.append(time.perf_counter() - start)
    return times


def timed_step(llm: LLM) -> float:
    start = time.perf_counter()
    llm.engine.step()
    return time.perf_counter() - start


def paired_decode(ray_llm: LLM, local: LLM, batch: int, warmup: int,
                  steps: int) -> tuple[list[float], list[float]]:
    """Decode steps of `batch` sequences on both engines, taking turns: (ray, local) times.

    A first, untimed pass of the same length touches the KV blocks the timed
    pass reuses (freed blocks are taken again first): the first touch of a
    page costs a fault that is not dispatch.
    """
    engines = (ray_llm.engine, local.engine)
    params = SamplingParams(temperature=0.0, max_tokens=warmup + steps + 4, ignore_eos=True)
    times: tuple[list[float], list[float]] = ([], [])
    for timed in (False, True):
        ids = [f"b{batch}-{timed}-{index}" for index in range(batch)]
        for engine in engines:
            for index, request_id in enumerate(ids):
                engine.add_request(request_id, [7 + index % 50] * PROMPT_TOKENS, params)
        try:
            for step in range(warmup + steps):
                local_time, ray_time = timed_step(local), timed_step(ray_llm)
                if timed and step >= warmup:
                    times[0].append(ray_time)
                    times[1].append(local_time)
            assert all(len(e.scheduler.running) == batch for e in engines), "steps must decode"
        finally:
            for engine in engines:
                for request_id in ids:
                    engine.abort_request(request_id)
    return times


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny-cpu.yaml")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--window-steps", type=int, default=1000)
    parser.add_argument("--settle-s", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dispatch.json"))
    args = parser.parse_args()

    torch.set_num_threads(1)  # as each Ray rank: one thread per worker
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    time.sleep(args.settle_s)  # Ray's start-up processes compete for the cores at first
    local = build(args.config, "local", 1)
    empty_steps(local, args.warmup)
    rows = [dict(executor="local TP=1", empty_step_ms=median_ms(empty_steps(local, args.steps)))]
    windows = {"local TP=1": [median_ms(empty_steps(local, args.window_steps))
                              for _ in range(args.windows)]}
    for name, tp_size, compiled in [("ray TP=1", 1, False), ("ray TP=1, compiled graph", 1, True),
                                    ("ray TP=2", 2, False)]:
        llm = build(args.config, "ray", tp_size, compiled)
        empty_steps(llm, args.warmup)
        row = dict(executor=name, empty_step_ms=median_ms(empty_steps(llm, args.steps)))
        for batch in args.batches:
            ray_times, local_times = paired_decode(llm, local, batch, args.warmup, args.steps)
            row[f"decode_b{batch}_ms"] = median_ms(ray_times)
            row[f"local_b{batch}_ms"] = median_ms(local_times)
            row[f"decode_b{batch}_added_ms"] = median_ms(
                [r - loc for r, loc in zip(ray_times, local_times, strict=True)])
        windows[name] = [median_ms(empty_steps(llm, args.window_steps))
                         for _ in range(args.windows)]
        llm.shutdown()
        rows.append(row)
        print(name, {k: round(v, 3) for k, v in row.items() if k != "executor"}, flush=True)

    print("\n| executor | empty step ms | "
          + " | ".join(f"decode b={b}: local / ray ms (added)" for b in args.batches) + " |")
    print("|---|---:|" + "---:|" * len(args.batches))
    for row in rows[1:]:
        cells = [f"{row['empty_step_ms']:.3f}"]
        cells += [f"{row[f'local_b{b}_ms']:.2f} / {row[f'decode_b{b}_ms']:.2f} "
                  f"({row[f'decode_b{b}_added_ms']:+.2f})" for b in args.batches]
        print(f"| {row['executor']} | " + " | ".join(cells) + " |")
    print(f"| local TP=1 | {rows[0]['empty_step_ms']:.3f} |" + " |" * len(args.batches))
    print(f"\nempty-step median per window of {args.window_steps} steps:")
    for name, values in windows.items():
        print(f"  {name}: " + ", ".join(f"{v:.3f}" for v in values) + " ms")
    default = rows[1]
    worst = max(default[f"decode_b{b}_added_ms"] for b in args.batches)
    print(f"\nRay TP=1 (plain calls, the CPU default) adds at most {worst:.2f} ms per decode step "
          f"(target <= 2 ms: {'met' if worst <= 2.0 else 'NOT met'})")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(
        date=datetime.date.today().isoformat(), machine=platform.machine(),
        torch=torch.__version__, ray=ray.__version__,
        args={k: str(v) for k, v in vars(args).items()}, rows=rows, windows=windows,
    ), indent=2))


if __name__ == "__main__":
    main()
