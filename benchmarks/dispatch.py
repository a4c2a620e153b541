"""Per-step cost of dispatching through Ray: RayExecutor against LocalExecutor.

The same tiny model (configs/tiny-cpu.yaml's random Llama, float32) runs
decode steps three ways in one invocation: LocalExecutor in this process, and
RayExecutor with one and with two tensor-parallel actors. Every engine's
workers use one torch thread per rank, so TP=1 computes the same work with
the same threads either way and the difference is the dispatch itself.
LocalExecutor runs before and after the Ray engines (after Ray's own start-up
processes have settled); the baseline is the mean of its two runs, and their
spread shows the noise of the machine.

Reported, as medians over `--steps` steps after `--warmup`:
- an empty step (no sequences: put, call every rank, wait, get) — the pure
  round trip;
- a decode step at batch 1 and batch 64 (EngineCore.step: schedule, execute,
  update), and what Ray adds to it over LocalExecutor;
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


def build(config_path: str, backend: str, tp_size: int) -> LLM:
    config = load(config_path)
    parallel = ParallelConfig(tensor_parallel_size=tp_size, distributed_executor_backend=backend,
                              worker_cpus=1.0)
    return LLM(config=config.model_copy(update={"parallel": parallel}))


def empty_steps(llm: LLM, steps: int) -> list[float]:
    execute, step = llm.engine.executor.execute, StepInput(seqs=[])
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        execute(step)
        times.append(time.perf_counter() - start)
    return times


def decode_steps(llm: LLM, batch: int, warmup: int, steps: int) -> list[float]:
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=warmup + steps + 4, ignore_eos=True)
    for index in range(batch):
        engine.add_request(f"b{batch}-{index}", [7 + index % 50] * PROMPT_TOKENS, params)
    times = []
    try:
        for step in range(warmup + steps):
            start = time.perf_counter()
            engine.step()
            if step >= warmup:  # prompts are computed in the first steps
                times.append(time.perf_counter() - start)
        assert len(engine.scheduler.running) == batch, "every step must be a decode of the batch"
    finally:
        for index in range(batch):
            engine.abort_request(f"b{batch}-{index}")
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
    rows, windows = [], {}
    runs = [("local", 1, "local TP=1 (before)"), ("ray", 1, "ray TP=1"), ("ray", 2, "ray TP=2"),
            ("local", 1, "local TP=1 (after)")]
    for backend, tp_size, name in runs:
        llm = build(args.config, backend, tp_size)
        empty_steps(llm, args.warmup)
        row = dict(executor=name, empty_step_ms=median_ms(empty_steps(llm, args.steps)))
        for batch in args.batches:
            # Untimed first pass: it touches the KV pool's pages for the first time.
            decode_steps(llm, batch, args.warmup, args.steps)
            row[f"decode_b{batch}_ms"] = median_ms(decode_steps(llm, batch, args.warmup, args.steps))
        windows[name] = [median_ms(empty_steps(llm, args.window_steps))
                         for _ in range(args.windows)]
        llm.shutdown()
        rows.append(row)
        print(name, {k: round(v, 3) for k, v in row.items() if k != "executor"}, flush=True)
    local = {key: (rows[0][key] + rows[-1][key]) / 2 for key in rows[0] if key.endswith("_ms")}
    for row in rows:
        for key in local:
            row[key.replace("_ms", "_added_ms")] = row[key] - local[key]

    batch_cols = [f"decode_b{b}" for b in args.batches]
    print("\n| executor | empty step ms | " + " | ".join(f"{c} ms (added)" for c in batch_cols)
          + " |")
    print("|---|---:|" + "---:|" * len(batch_cols))
    for row in rows:
        cells = [f"{row['empty_step_ms']:.3f} ({row['empty_step_added_ms']:+.3f})"]
        cells += [f"{row[c + '_ms']:.2f} ({row[c + '_added_ms']:+.2f})" for c in batch_cols]
        print(f"| {row['executor']} | " + " | ".join(cells) + " |")
    print(f"\nempty-step median per window of {args.window_steps} steps:")
    for name, values in windows.items():
        print(f"  {name}: " + ", ".join(f"{v:.3f}" for v in values) + " ms")
    ray_tp1 = next(r for r in rows if r["executor"] == "ray TP=1")
    worst = max(ray_tp1[f"{c}_added_ms"] for c in batch_cols)
    print(f"\nRay TP=1 adds at most {worst:.2f} ms per decode step "
          f"(target <= 2 ms: {'met' if worst <= 2.0 else 'NOT met'})")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(
        date=datetime.date.today().isoformat(), machine=platform.machine(),
        torch=torch.__version__, ray=ray.__version__,
        args={k: str(v) for k, v in vars(args).items()}, rows=rows, windows=windows,
    ), indent=2))


if __name__ == "__main__":
    main()
