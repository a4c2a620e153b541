"""The engine's host work per decode step at a large batch, on the simulated H200.

The simulated device sleeps through each step's roofline time, which takes no
CPU; so the engine thread's CPU time is the host's work: planning the step
(`Scheduler.schedule`), taking its tokens in (`Scheduler.update`), and the rest
of `EngineCore.step` (detokenizing, building outputs, and the simulator's own
sampling). With asynchronous scheduling (the GPU default) it overlaps the
device's time, and it caps the batch where it exceeds it.

Reported, per decode step (every sequence decoding one token) and per sequence:
the medians over the steps of each round, then the median over rounds. Compare
two versions of the code by running this script alternately in each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pagedserve import LLM, SamplingParams  # noqa: E402
from pagedserve.config import load  # noqa: E402
from pagedserve.engine.core import EngineCore  # noqa: E402
from pagedserve.scheduler.scheduler import Scheduler  # noqa: E402

SIM_CONFIG = ROOT / "configs" / "llama-3-8b-h200-sim.yaml"


class Timed:
    """The thread CPU time of each call to a method, while `on`."""

    def __init__(self, cls: type, name: str) -> None:
        self.seconds: list[float] = []
        self.on = False
        original = getattr(cls, name)

        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                if self.on:
                    self.seconds.append(time.thread_time() - start)

        setattr(cls, name, timed)


def run(batch: int, prompt_len: int, max_tokens: int, rounds: int) -> dict:
    llm = LLM(config=load(SIM_CONFIG))
    text = llm.engine.executor.worker.text
    schedule, update, step = (Timed(Scheduler, "schedule"), Timed(Scheduler, "update"),
                              Timed(EngineCore, "step"))
    decoding: list[bool] = []  # for each step taken in: every sequence decoding
    take_in = Scheduler.update

    def noted(self, step_input, step_output):
        decoding.append(bool(step_input.seqs) and all(
            seq.num_tokens == 1 for seq in step_input.seqs) and len(step_input.seqs) == batch)
        return take_in(self, step_input, step_output)

    Scheduler.update = noted
    rows = []
    for round_ in range(rounds):
        prompts = [{"prompt_token_ids": [text[(round_ * 7919 + seed * 104_729 + i) % len(text)]
                                         for i in range(prompt_len)]} for seed in range(batch)]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        for timer in (schedule, update, step):
            timer.seconds.clear()
            timer.on = True
        decoding.clear()
        llm.generate(prompts, params, use_tqdm=False)
        for timer in (schedule, update, step):
            timer.on = False
        # With async scheduling, schedule() and step() calls pair with the steps one
        # to one; update() calls are the steps taken in, in order.
        n = min(len(schedule.seconds), len(update.seconds), len(step.seconds), len(decoding))
        steady = [i for i in range(n) if decoding[i]]
        row = {"round": round_, "decode_steps": len(steady)}
        for name, timer in (("schedule", schedule), ("update", update), ("step", step)):
            row[f"{name}_us_per_seq"] = statistics.median(
                timer.seconds[i] for i in steady) / batch * 1e6
        rows.append(row)
        print(f"  round {round_}: " + ", ".join(f"{key} {value:.2f}" for key, value in row.items()
                                                if key.endswith("per_seq")), flush=True)
    result = {key: statistics.median(row[key] for row in rows)
              for key in rows[0] if key.endswith("per_seq")}
    result["step_ms"] = result["step_us_per_seq"] * batch / 1e3
    return {"batch": batch, "rounds": rows, "median": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                        "host_step.json")
    args = parser.parse_args()
    result = run(args.batch, args.prompt_len, args.max_tokens, args.rounds)
    median = result["median"]
    print(f"batch {args.batch}: schedule {median['schedule_us_per_seq']:.2f} us/seq, update "
          f"{median['update_us_per_seq']:.2f} us/seq, whole step "
          f"{median['step_us_per_seq']:.2f} us/seq ({median['step_ms']:.2f} ms)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
